"""Safe state and true status: commands on one deployment take turns (a file lock), and a deployment that rolled out
but is not ready now says so in `apply` and `rollout status` instead of "unchanged" / "complete"."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.apply.conftest import make_plan
from vdeploy.cli import main
from vdeploy.state import Deployment, StateError

HOLD_LOCK = """
import sys, time
from vdeploy.state import Deployment
with Deployment("demo").command_lock("apply"):
    print("held", flush=True)
    time.sleep(float(sys.argv[1]))
"""


def _hold_lock_elsewhere(seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_command_waits_for_the_first_then_runs(state_dir: Path) -> None:
    holder = _hold_lock_elsewhere(1.5)
    waits: list[str] = []
    started = time.monotonic()
    with Deployment("demo").command_lock("rollout undo", timeout=30, on_wait=waits.append):
        waited = time.monotonic() - started
    holder.wait()
    assert 0.5 < waited < 10 and waits == [f"`vdeploy apply` (pid {holder.pid})"]


def test_a_command_that_waits_too_long_fails_naming_the_holder(state_dir: Path) -> None:
    holder = _hold_lock_elsewhere(30)
    try:
        with pytest.raises(StateError, match=rf"being changed by `vdeploy apply` \(pid {holder.pid}\); gave up after"):
            with Deployment("demo").command_lock("apply", timeout=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()
    with Deployment("demo").command_lock("apply", timeout=5):  # a killed holder's lock dies with it
        pass
    assert not (state_dir / "demo").exists()  # taking the lock does not make a deployment appear


@pytest.fixture
def rolled_out_but_down(state_dir: Path):
    """A deployment whose revision 1 rolled out, with a live supervisor (this process holds its lock) and 0 of 2
    replicas ready: one crashed just now."""
    deployment = Deployment("demo")
    revision = deployment.add_revision(make_plan(replicas=2))
    lock = deployment.hold_lock()
    replica = {"index": 0, "revision": 1, "pid": None, "state": "crashed", "restarts": 1}
    deployment.write_status(
        {
            "revision": revision,
            "rollout": {"revision": revision, "phase": "complete", "strategy": "rolling", "finished_at": 1.0},
            "replicas": [
                {**replica, "last_error": "old: RuntimeError: boom", "last_error_at": 2.0},
                {**replica, "index": 1, "last_error": "unhealthy: GET /health answered 503", "last_error_at": 3.0},
            ],
        }
    )
    yield deployment
    import os

    os.close(lock)


def test_rollout_status_of_a_deployment_that_is_down_is_not_complete(rolled_out_but_down, capsys) -> None:
    assert main(["rollout", "status", "demo"]) == 1
    out = capsys.readouterr().out
    assert "revision 1 complete (rolling), but 0/2 replicas ready: unhealthy: GET /health answered 503" in out


def test_status_shows_the_newest_error(rolled_out_but_down, capsys) -> None:
    assert main(["status", "demo", "--format", "json"]) == 0
    assert '"last_error": "unhealthy: GET /health answered 503"' in capsys.readouterr().out


def test_a_killed_supervisor_is_reported_not_a_complete_rollout(state_dir: Path, capsys) -> None:
    """Its status.json still names it (a supervisor that stops writes null): the deployment is wanted and down."""
    deployment = Deployment("demo")
    revision = deployment.add_revision(make_plan(replicas=2))
    ready = {"index": 0, "revision": 1, "pid": 99999999, "state": "ready", "restarts": 0}
    deployment.write_status(
        {
            "supervisor_pid": 99999999,  # no lock held: it is gone
            "revision": revision,
            "rollout": {"revision": revision, "phase": "complete", "strategy": "rolling", "finished_at": 1.0},
            "replicas": [ready, {**ready, "index": 1}],
        }
    )
    assert main(["rollout", "status", "demo"]) == 1
    out = capsys.readouterr().out
    assert "revision 1 complete (rolling), but 0/2 replicas ready: the supervisor (pid 99999999) is gone" in out
    assert main(["status", "demo", "--format", "json"]) == 0
    assert '"running": false' in (out := capsys.readouterr().out) and "`vdeploy apply` starts it again" in out
