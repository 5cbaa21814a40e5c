"""`vdeploy apply` end to end: the real CLI, supervisor, router and engine replicas serving the quick-start model
(SmolLM2-135M GGUF on the CPU). The tests share one deployment and run in order, because each replica start loads
the model; together they walk a deployment's life: apply, no-op apply, rollout under load, broken revisions, crash
restart, undo, supervisor killed mid-apply, delete."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fixtures.deployments import CliDeployment, Load, live, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart-smollm2-cpu.yaml"
NAME = f"quickstart-e2e-{os.getpid()}"  # unique: other runs on this host must not match our processes
WAIT = "300"  # seconds apply may wait for a replica (the model loads in ~15-50 s on a busy 2-core box)


class World(CliDeployment):
    """The quick-start recipe under a private state directory, and files of it with changes."""

    def __init__(self, root: Path):
        super().__init__(root, NAME)
        self.env.pop("VDEPLOY_UNSET_KEY", None)
        self.base = yaml.safe_load(QUICKSTART.read_text())
        self.base.update(name=NAME, server={**self.base.get("server", {}), "port": self.port})

    def recipe(self, file: str = "recipe.yaml", **changes) -> Path:
        data = json.loads(json.dumps(self.base))
        for dotted, value in changes.items():
            *parents, leaf = dotted.split("__")
            node = data
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        path = self.root / file
        path.write_text(yaml.safe_dump(data))
        return path

    def complete(self, client: httpx.Client) -> httpx.Response:
        body = {
            "model": self.base["served_model_name"],
            "prompt": "The capital of France is",
            "max_tokens": 4,
            "temperature": 0,
        }
        return client.post(self.url("/v1/completions"), json=body, timeout=60)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    world = World(tmp_path_factory.mktemp("apply-e2e"))
    yield world
    world.vdeploy("delete", NAME, timeout=120)
    for proc in world.processes():  # never leave a replica behind, even when a test failed midway
        proc.kill()


def test_apply_serves_through_the_router(world: World) -> None:
    started = time.monotonic()
    result = world.vdeploy("apply", str(world.recipe()), "--timeout", WAIT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{NAME}: rolled out (revision 1) at http://127.0.0.1:{world.port}" in result.stdout
    print(f"apply-to-ready: {time.monotonic() - started:.1f}s")
    # Piped, apply says what the replica is doing, from the engine's own start-up events.
    progress = [line for line in result.stderr.splitlines() if line.startswith(f"{NAME} revision 1 replica 0: ")]
    assert any(" loading " in line and " weights (" in line for line in progress), result.stderr
    assert progress[-1].endswith(": ready") and any(line.endswith(": warming") for line in progress), result.stderr
    with httpx.Client() as client:
        reply = world.complete(client)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"]
        assert reply.headers["x-vdeploy-revision"] == "1"
        events = []
        body = {"model": world.base["served_model_name"], "prompt": "Hi", "max_tokens": 3, "stream": True}
        with client.stream("POST", world.url("/v1/completions"), json=body, timeout=60) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 2  # server-sent events pass through the router
    status = world.status()
    assert (status["revision"], status["ready"], status["desired"]) == (1, 1, 1)
    assert status["url"] == f"http://127.0.0.1:{world.port}" and status["memory_bytes"] > 0
    # Predicted vs measured memory per replica, from the replica's /metrics.
    memory = status["replicas"][0]["memory"]
    components = {"weights", "activation", "cuda_graph", "overhead", "kv_cache"}
    assert set(memory["predicted"]) == set(memory["measured"]) == components
    assert memory["measured"]["kv_cache"] == memory["predicted"]["kv_cache"] > 0  # the CPU cache has the plan's size
    text = world.vdeploy("status", NAME).stdout
    assert all(re.search(rf"^\s+{name}\s+[\d.]+\s+[\d.]+$", text, re.MULTILINE) for name in components), text


def test_unchanged_apply_touches_nothing(world: World) -> None:
    before = world.status()["replicas"][0]["pid"]
    state = world.root / "state" / NAME
    snapshot = {p: p.stat().st_mtime_ns for p in state.rglob("*.json")}
    result = world.vdeploy("apply", str(world.recipe()))
    assert result.returncode == 0 and f"{NAME}: unchanged (revision 1)" in result.stdout
    assert world.status()["replicas"][0]["pid"] == before
    assert {p: p.stat().st_mtime_ns for p in state.rglob("*.json")} == snapshot
    assert world.vdeploy("plan", str(world.recipe()), "--detailed-exitcode").returncode == 0
    assert world.vdeploy("plan", str(world.recipe(memory__max_num_seqs=2)), "--detailed-exitcode").returncode == 2


def test_rollout_under_load_fails_no_request(world: World) -> None:
    with Load(world.complete, clients=1) as load:
        result = world.vdeploy("apply", str(world.recipe(memory__max_num_seqs=2)), "--timeout", WAIT, "-o", "json")
        time.sleep(1.0)  # a few requests against the new revision
    assert result.returncode == 0, result.stdout + result.stderr
    assert [(r["action"], r["revision"]) for r in json.loads(result.stdout)] == [("rolled out", 2)]
    # With -o json, the replica's phases are JSON events on stderr.
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    phases = [e["phase"] for e in events if (e["event"], e["name"], e["revision"]) == ("replica", NAME, 2)]
    assert "loading" in phases and phases.index("loading") < phases.index("warming") and phases[-1] == "ready"
    assert not load.failures(), f"during the rollout: {load.report()}"
    revisions = [o.revision for o in load.outcomes]
    assert "1" in revisions and revisions[-1] == "2"  # served throughout: old revision first, new one at the end
    assert world.status()["revision"] == 2


def test_broken_revisions_fail_with_their_cause_and_old_keeps_serving(world: World) -> None:
    missing = world.vdeploy("apply", str(world.recipe(model=str(world.root / "gone.gguf"))))
    assert missing.returncode == 1
    assert "gone.gguf" in missing.stderr and "does not exist" in missing.stderr

    impossible = world.vdeploy(
        "apply", str(world.recipe(memory__max_model_len=8192, memory__gpu_memory_utilization=0.7))
    )
    assert impossible.returncode == 1 and "error[VD302]" in impossible.stderr  # one sequence cannot fit

    # Compiles, but the replica cannot start: the API key variable the recipe names is not set.
    no_key = world.vdeploy("apply", str(world.recipe(server__api_key_env="VDEPLOY_UNSET_KEY")), "--timeout", WAIT)
    assert no_key.returncode == 1
    assert "failed" in no_key.stderr and "VDEPLOY_UNSET_KEY" in no_key.stderr
    assert "revision 2 keeps serving" in no_key.stderr
    status = world.status()
    assert status["revision"] == 2 and status["ready"] == 1
    assert "VDEPLOY_UNSET_KEY" in status["last_error"]
    with httpx.Client() as client:
        assert world.complete(client).headers["x-vdeploy-revision"] == "2"


def test_killed_replica_is_restarted(world: World) -> None:
    pid = world.status()["replicas"][0]["pid"]
    os.kill(pid, signal.SIGKILL)

    def restarted():
        status = world.status()
        replica = status["replicas"][0]
        return replica["pid"] != pid and replica["state"] == "ready" and status

    status = wait_until(restarted, 300, "the supervisor to restart the killed replica")
    assert status["restarts"] == 1 and "SIGKILL" in status["replicas"][0]["last_error"]
    with httpx.Client() as client:
        assert world.complete(client).status_code == 200


def test_rollout_undo_and_history(world: World) -> None:
    history = world.vdeploy("rollout", "history", NAME)
    assert history.returncode == 0 and "(serving)" in history.stdout
    undone_at = datetime.now().replace(microsecond=0)
    assert world.vdeploy("rollout", "undo", NAME, "--to-revision", "1", "--no-wait").returncode == 0
    # As `kubectl rollout status`: it waits for the rollout to end, saying how far it got, and exits 0.
    result = world.vdeploy("rollout", "status", NAME, "--timeout", WAIT)
    assert result.returncode == 0, result.stderr
    assert f"{NAME}: revision 1 complete" in result.stdout
    assert world.status()["revision"] == 1
    logs = world.vdeploy("logs", NAME, "--since", undone_at.isoformat())
    assert logs.returncode == 0 and logs.stdout.startswith("--- vdeploy ") and "start revision 1 replica 0" in logs.stdout
    assert "Application startup complete" in world.vdeploy("logs", NAME, "--tail", "200").stdout


def test_supervisor_killed_mid_apply_then_next_apply_recovers(world: World) -> None:
    recipe = world.recipe(memory__max_num_seqs=3)
    assert world.vdeploy("apply", str(recipe), "--no-wait").returncode == 0
    status = wait_until(lambda: len(world.status()["replicas"]) == 2 and world.status(), 60, "the new replica")
    supervisor, replicas = world.supervisor_pid(), [r["pid"] for r in status["replicas"]]
    os.kill(supervisor, signal.SIGKILL)
    # The replicas die with it (PR_SET_PDEATHSIG), and the state stays readable.
    wait_until(lambda: not any(map(live, replicas)), 15, "the replicas to die with their supervisor")
    status = world.status()
    assert status["running"] is False and status["revision"] is None
    result = world.vdeploy("apply", str(recipe), "--timeout", WAIT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert world.status()["revision"] == 4 and world.status()["ready"] == 1  # 3 is the broken one


def test_two_replicas_roll_one_at_a_time_and_share_the_load(world: World) -> None:
    recipe = world.recipe(memory__max_num_seqs=3, parallelism__data_parallel_size=2)
    result = world.vdeploy("apply", str(recipe), "--timeout", WAIT)
    assert result.returncode == 0, result.stdout + result.stderr
    status = world.status()
    assert (status["revision"], status["ready"], status["desired"]) == (5, 2, 2)
    assert status["rollout"]["strategy"] == "rolling"
    log = (world.root / "state" / NAME / "logs" / "supervisor.log").read_text()
    order = [
        log.index("started revision 5 replica 0"),
        log.index("revision 5 replica 0 serving"),
        log.index("started revision 5 replica 1"),
    ]
    assert order == sorted(order)  # the second replica starts only once the first serves
    with httpx.Client() as client, ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: world.complete(client), range(8)))
    assert all(r.status_code == 200 for r in replies)
    assert {r.headers["x-vdeploy-replica"] for r in replies} == {"0", "1"}  # least outstanding spreads the load


def test_delete_leaves_no_process(world: World) -> None:
    assert world.processes()
    result = world.vdeploy("delete", NAME, timeout=120)
    assert result.returncode == 0, result.stderr
    assert world.processes() == []
    assert not (world.root / "state" / NAME).exists()
    assert world.vdeploy("status", NAME).returncode == 1


def test_foreground_supervisor_stops_cleanly_on_sigterm(world: World) -> None:
    # As systemd or a container runtime runs it: `apply --foreground` is the supervisor; SIGTERM stops everything.
    process = subprocess.Popen(
        [sys.executable, "-m", "vdeploy.cli", "apply", str(world.recipe()), "--foreground"],
        env=world.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        status_file = world.root / "state" / NAME / "status.json"
        wait_until(lambda: status_file.exists() and world.status()["ready"] == 1, 300, "the foreground replica")
        with httpx.Client() as client:
            assert world.complete(client).status_code == 200
        assert world.supervisor_pid() == process.pid
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
    assert world.processes() == []
