"""Supervisor bookkeeping with real (tiny) processes: restart backoff and crash-loop reporting."""

from __future__ import annotations

import sys
from pathlib import Path

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
