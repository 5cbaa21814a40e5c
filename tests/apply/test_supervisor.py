"""Supervisor bookkeeping with real (tiny) processes: restart backoff and crash-loop reporting, on a clock the test
moves by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vdeploy import supervisor as supervisor_module
from vdeploy.state import Deployment
from vdeploy.supervisor import Replica, Supervisor, assign_gpus, free_port


def test_crashing_replica_backs_off_exponentially_and_is_reported_as_a_crash_loop(state_dir: Path) -> None:
    supervisor = Supervisor(Deployment("demo"))
    argv = [sys.executable, "-c", "import sys; sys.exit('Runtime' + 'Error: boom')"]
    replica = Replica(1, 0, free_port(), None, argv, {}, state_dir / "r.log")
    replica.start()
    replica.state, replica.ever_ready = "ready", True  # it served once: from now on crashes are restarted
    supervisor.replicas.append(replica)
    supervisor.serving_revision = 1

    delays = []
    for _ in range(4):
        replica.process.wait()
        supervisor._watch_exits()
        assert replica.state == "crashed" and replica.last_error == "RuntimeError: boom"
        delays.append(replica.backoff_s)
        replica.restart_at = 0.0  # do not sleep through the backoff in a test
        supervisor._watch_exits()
        assert replica.state == "starting"
    assert delays == [1, 2, 4, 8]
    assert replica.restarts == 4 and replica.crash_loop
    status = Deployment("demo").status()["replicas"][0]
    assert status["crash_loop"] and status["restarts"] == 4 and status["last_error"] == "RuntimeError: boom"
    replica.process.wait()


def test_gpus_are_assigned_per_replica_and_a_full_host_says_so() -> None:
    from tests.apply.conftest import make_plan

    plan = make_plan(replicas=2, gpu_count=4, device="cuda", dtype="float16", tensor_parallel_size=2)
    assert assign_gpus(plan, set(), count=2) == [[0, 1], [2, 3]]
    assert assign_gpus(plan, {1}, count=2) is None  # blue/green needs 4 free GPUs: the rollout goes one at a time
    assert assign_gpus(plan, {0, 1}, count=1) == [[2, 3]]  # room for one new replica next to an old one
    assert assign_gpus(plan, {0, 1, 2}, count=1) is None
    assert assign_gpus(make_plan(replicas=3), set(), count=3) == [None, None, None]  # CPU replicas get no GPUs


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_crash_loop_needs_three_quick_crashes_and_a_stable_minute_resets_it(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exactly CRASH_LOOP_AFTER (3) crashes, each within 60 s of its start, make a crash loop; a replica ready for
    more than 60 s forgets its crashes, and a crash 60 s or more after its start counts as the first again."""
    clock = _Clock()
    monkeypatch.setattr(supervisor_module, "clock", clock)
    flag = state_dir / "crash-now"
    # Runs until the test creates `flag`, then crashes: the test decides when each crash happens on its clock.
    script = f"import os, sys, time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.02)\nsys.exit('boom')"
    supervisor = Supervisor(Deployment("demo"))
    replica = Replica(1, 0, free_port(), None, [sys.executable, "-c", script], {}, state_dir / "r.log")
    supervisor.replicas.append(replica)
    supervisor.serving_revision = 1

    def start_ready() -> None:
        flag.unlink(missing_ok=True)
        if replica.process is None:
            replica.start()
        else:
            clock.now = replica.restart_at
            supervisor._watch_exits()  # the backoff is over: restarted
            assert replica.state == "starting"
        replica.state, replica.ever_ready, replica.ready_since = "ready", True, clock.now

    def crash_after(seconds: float) -> None:
        clock.now += seconds
        supervisor._watch_exits()  # still running: nothing happens
        assert replica.state == "ready"
        flag.touch()
        replica.process.wait()
        supervisor._watch_exits()
        assert replica.state == "crashed"

    start_ready()
    crash_after(1)
    start_ready()
    crash_after(59.9)  # just inside the minute: a second quick crash
    assert (replica.quick_crashes, replica.crash_loop) == (2, False)
    start_ready()
    crash_after(30)
    assert (replica.quick_crashes, replica.crash_loop) == (3, True)
    assert replica.backoff_s == 4

    start_ready()  # up again, and stays up
    clock.now += supervisor_module.STABLE_AFTER_S
    supervisor._watch_exits()
    assert replica.crash_loop, "exactly 60 s ready is not yet stable"
    clock.now += 0.1
    supervisor._watch_exits()
    assert (replica.quick_crashes, replica.crash_loop) == (0, False)
    crash_after(0)  # 60.1 s after its start: the first crash of a new series
    assert (replica.quick_crashes, replica.backoff_s) == (1, 1)

    start_ready()
    crash_after(supervisor_module.STABLE_AFTER_S)  # a crash a full minute after the start is not a quick one
    assert (replica.quick_crashes, replica.crash_loop) == (1, False)
    flag.touch()
