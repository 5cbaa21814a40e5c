"""The day-2 commands' kubectl habits against a real state directory: `rollout status` waits for the supervisor's
record of the rollout (the status file and the supervisor lock, written here as the supervisor writes them), status
and history in every output form."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from pydantic import ConfigDict, TypeAdapter
from typing_extensions import TypedDict

from tests.apply.conftest import make_plan
from tests.fixtures.golden import assert_golden
from vdeploy.commands.rollout import history_text
from vdeploy.commands.status import render
from vdeploy.state import Deployment

REPO = Path(__file__).resolve().parents[2]


def vdeploy(*args: str, state_dir: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "VDEPLOY_STATE_DIR": str(state_dir)}
    return subprocess.Popen([sys.executable, "-m", "vdeploy.cli", *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def rolling_out(state_dir: Path) -> tuple[Deployment, int]:
    """A deployment whose supervisor (this test, holding its lock) is rolling out revision 1."""
    deployment = Deployment("demo")
    revision = deployment.add_revision(make_plan("demo"))
    generation = deployment.request(revision)
    rollout = {"revision": revision, "generation": generation, "phase": "progressing"}
    deployment.write_status({"revision": None, "rollout": rollout, "replicas": [_replica(revision, "starting")]})
    return deployment, generation


def _replica(revision: int, state: str) -> dict:
    return {"index": 0, "revision": revision, "pid": None, "port": 1, "gpus": None, "state": state, "restarts": 0,
            "crash_loop": False, "last_error": None}


def test_rollout_status_waits_until_the_rollout_completes(state_dir: Path) -> None:
    deployment, generation = rolling_out(state_dir)
    lock = deployment.hold_lock()
    try:
        waiting = vdeploy("rollout", "status", "demo", state_dir=state_dir)
        time.sleep(2.0)
        assert waiting.poll() is None  # still waiting: nothing has finished
        rollout = {"revision": 1, "generation": generation, "phase": "complete", "strategy": "all at once"}
        deployment.write_status({"revision": 1, "rollout": rollout, "replicas": [_replica(1, "ready")]})
        out, err = waiting.communicate(timeout=30)
    finally:
        os.close(lock)
    assert waiting.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "Waiting for demo revision 1: 0 of 1 new replicas ready"
    assert lines[-1] == "demo: revision 1 complete (all at once)"


def test_rollout_status_exits_1_with_the_reason_when_the_rollout_fails(state_dir: Path) -> None:
    deployment, generation = rolling_out(state_dir)
    lock = deployment.hold_lock()
    try:
        waiting = vdeploy("rollout", "status", "demo", "-o", "json", state_dir=state_dir)
        time.sleep(1.0)
        rollout = {"revision": 1, "generation": generation, "phase": "failed", "reason": "CUDA out of memory"}
        deployment.write_status({"revision": None, "rollout": rollout, "replicas": []})
        out, _ = waiting.communicate(timeout=30)
    finally:
        os.close(lock)
    assert waiting.returncode == 1
    assert json.loads(out) == {"name": "demo", **rollout, "ready": 0, "desired": 0, "exit_code": 1}


def test_rollout_status_timeout_and_a_dead_supervisor_are_failures(state_dir: Path) -> None:
    deployment, _ = rolling_out(state_dir)
    lock = deployment.hold_lock()
    try:
        started = time.monotonic()
        timed_out = vdeploy("rollout", "status", "demo", "--timeout", "1s", state_dir=state_dir)
        out, _ = timed_out.communicate(timeout=30)
        assert timed_out.returncode == 1 and "not ready after 1s" in out
        assert time.monotonic() - started < 20
        now = vdeploy("rollout", "status", "demo", "--no-watch", state_dir=state_dir)
        assert now.wait(timeout=30) == 2  # in progress, as before
    finally:
        os.close(lock)
    gone = vdeploy("rollout", "status", "demo", state_dir=state_dir)  # the lock is free: no supervisor
    out, _ = gone.communicate(timeout=30)
    assert gone.returncode == 1 and "the supervisor exited" in out


class ReplicaJson(TypedDict):
    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]  # the supervisor's own bookkeeping
    index: int
    revision: int
    state: str
    pid: int | None
    port: int
    gpus: list[int] | None
    restarts: int
    last_error: str | None
    rss_bytes: int | None


class StatusJson(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    name: str
    model: str | None
    running: bool
    url: str | None
    revision: int | None
    ready: int
    desired: int
    restarts: int
    crash_loop: bool
    memory_bytes: int
    rollout: dict
    last_error: str | None
    replicas: list[ReplicaJson]


def test_status_json_yaml_and_the_table(state_dir: Path, capsys) -> None:
    from vdeploy.cli import main

    deployment, generation = rolling_out(state_dir)
    lock = deployment.hold_lock()
    try:
        rollout = {"revision": 1, "generation": generation, "phase": "complete", "strategy": "all at once"}
        deployment.write_status({"revision": 1, "url": "http://127.0.0.1:8000", "rollout": rollout,
                                 "replicas": [_replica(1, "ready")]})
        assert main(["status", "demo", "-o", "json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert main(["status", "demo", "-o", "yaml"]) == 0
        assert yaml.safe_load(capsys.readouterr().out) == data
        assert main(["status", "-o", "json"]) == 0
        assert json.loads(capsys.readouterr().out) == [data]
    finally:
        os.close(lock)
    TypeAdapter(StatusJson).validate_python(data, strict=True)
    assert (data["running"], data["ready"], data["desired"], data["model"]) == (True, 1, 1, "/models/demo")


def _status_row(**changes) -> dict:
    row = {"name": "quickstart", "model": "/models/smollm2.gguf", "running": True, "url": "http://127.0.0.1:8000",
           "revision": 3, "ready": 1, "desired": 2, "restarts": 4, "crash_loop": True, "memory_bytes": 734003200,
           "rollout": {"revision": 3, "phase": "progressing", "strategy": "rolling"}, "last_error": None,
           "replicas": [{"index": 0, "revision": 3, "state": "ready", "pid": 4242, "port": 40001, "gpus": None,
                         "restarts": 4, "crash_loop": True, "last_error": "RuntimeError: boom"}]}
    return {**row, **changes}


def test_status_table_text_and_wide() -> None:
    rows = [_status_row(), _status_row(name="stopped-one", running=False, url=None, revision=None, ready=0,
                                       desired=0, restarts=0, crash_loop=False, memory_bytes=0, rollout={},
                                       model=None, last_error="the supervisor exited", replicas=[])]
    assert_golden("status.txt", render(rows, None, "text") + "\n")
    assert_golden("status-wide.txt", render(rows, None, "wide") + "\n")
    assert_golden("status-one.txt", render(rows[:1], "quickstart", "text") + "\n")


def test_rollout_history_forms(state_dir: Path, capsys) -> None:
    from vdeploy.cli import main

    deployment = Deployment("demo")
    deployment.add_revision(make_plan("demo", max_model_len=2048))
    deployment.add_revision(make_plan("demo", max_model_len=4096, replicas=2))
    assert main(["rollout", "history", "demo", "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["revision"], r["replicas"], r["engine"]["max_model_len"], r["serving"]) for r in rows] == [
        (1, 1, 2048, False), (2, 2, 4096, False)]
    for row in rows:
        row["created"] = "2026-01-01T00:00:00"  # the files' times differ from run to run
    assert_golden("rollout-history.txt", history_text(rows, wide=False) + "\n")
    assert_golden("rollout-history-wide.txt", history_text(rows, wide=True) + "\n")


def test_status_watch_prints_each_change(state_dir: Path) -> None:
    deployment, generation = rolling_out(state_dir)
    lock = deployment.hold_lock()
    watching = vdeploy("status", "demo", "--watch", "--interval", "0.2", "-o", "json", state_dir=state_dir)
    try:
        first = json.loads(watching.stdout.readline())
        rollout = {"revision": 1, "generation": generation, "phase": "complete", "strategy": "all at once"}
        deployment.write_status({"revision": 1, "rollout": rollout, "replicas": [_replica(1, "ready")]})
        second = json.loads(watching.stdout.readline())
    finally:
        watching.kill()
        watching.wait()
        os.close(lock)
    assert (first["ready"], first["rollout"]["phase"]) == (0, "progressing")
    assert (second["ready"], second["rollout"]["phase"]) == (1, "complete")
