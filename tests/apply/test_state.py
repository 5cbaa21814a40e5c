from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.apply.conftest import make_plan
from vdeploy.state import Deployment, StateError, atomic_write, fingerprint, list_deployments, read_json, state_root


def test_state_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VDEPLOY_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_root() == tmp_path / "xdg" / "vdeploy"
    monkeypatch.setenv("VDEPLOY_STATE_DIR", str(tmp_path / "override"))
    assert state_root() == tmp_path / "override"
    monkeypatch.delenv("VDEPLOY_STATE_DIR")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert state_root() == Path(os.path.expanduser("~")) / ".local" / "state" / "vdeploy"


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "status.json"
    atomic_write(target, "old")
    atomic_write(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["status.json"]


def test_failed_write_keeps_the_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "status.json"
    atomic_write(target, "old")

    def crash(*_):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_torn_state_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text('{"revision": ')
    with pytest.raises(StateError, match="status.json: unreadable"):
        read_json(tmp_path / "status.json")


def test_fingerprint_ignores_diagnostics_but_not_engine_settings() -> None:
    plan = make_plan()
    assert fingerprint({**plan, "diagnostics": [{"code": "VD1", "line": 3}]}) == fingerprint(plan)
    assert fingerprint(make_plan(max_model_len=1024)) != fingerprint(plan)
    assert fingerprint(make_plan(replicas=2)) != fingerprint(plan)


def test_revisions_grow_and_identical_plans_are_found(state_dir: Path) -> None:
    deployment = Deployment("demo")
    assert deployment.revisions() == []
    first = deployment.add_revision(make_plan())
    second = deployment.add_revision(make_plan(max_model_len=1024))
    assert (first, second) == (1, 2)
    assert deployment.find_revision(make_plan()) == 1
    assert deployment.find_revision(make_plan(max_model_len=512)) is None
    assert deployment.plan(2)["engine"]["max_model_len"] == 1024
    with pytest.raises(StateError, match="no revision 7"):
        deployment.plan(7)
    assert [d.name for d in list_deployments()] == ["demo"]


def test_each_request_gets_a_new_generation(state_dir: Path) -> None:
    deployment = Deployment("demo")
    assert deployment.request(1) == 1
    assert deployment.request(1) == 2
    assert deployment.desired()["revision"] == 1


def test_supervisor_lock_is_exclusive(state_dir: Path) -> None:
    deployment = Deployment("demo")
    assert not deployment.supervisor_alive()
    fd = deployment.hold_lock()
    assert fd is not None
    try:
        assert deployment.supervisor_alive()
        assert deployment.hold_lock() is None
    finally:
        os.close(fd)
    assert not deployment.supervisor_alive()


@pytest.mark.parametrize("name", ["../etc", "Demo", "a/b", "", "-x"])
def test_bad_deployment_names_are_refused(name: str, state_dir: Path) -> None:
    with pytest.raises(StateError, match="not valid"):
        Deployment(name)
