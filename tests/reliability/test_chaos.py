"""Chaos against a real deployment (`vdeploy apply`: supervisor, router, two engine replicas of the tiny model on the
CPU): kill -9 of a replica under load, a replica that hangs, two applies at once with the first killed mid-rollout,
kill -9 of the supervisor (which holds the router) mid-rollout, a failed first apply. Requests are counted; where the router can
retry, none may fail; no process outlives its deployment; the state stays readable and says what happened. The
outcomes are the ones docs/reliability.md promises."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.fixtures.deployments import CliDeployment, Load, live, wait_until

pytestmark = pytest.mark.slow

NAME = "chaos"
WAIT = "240"


class Deployment(CliDeployment):
    """A recipe over the tiny model with two replicas, in a private state directory."""

    def __init__(self, root: Path, model_dir: Path, name: str = NAME):
        super().__init__(root, name)
        self.recipe_data = {
            "name": name,
            "model": str(model_dir),
            "served_model_name": "tiny",
            "hardware": "cpu",
            "dtype": "float32",
            "memory": {"max_model_len": 256, "max_num_seqs": 4},
            "parallelism": {"data_parallel_size": 2},
            "server": {"port": self.port},
            # Probed every second so a hang is seen quickly, with the default 5 s timeout: a replica busy on a loaded
            # 2-core box may take over a second to answer, and is not unhealthy for it.
            "health": {"interval": 1, "failure_threshold": 2},
        }

    def recipe(self, file: str = "recipe.yaml", **sections) -> Path:
        data = json.loads(json.dumps(self.recipe_data))
        for key, value in sections.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
        path = self.root / file
        path.write_text(yaml.safe_dump(data))
        return path

    def plan(self, revision: int) -> dict:
        return json.loads((self.state / "revisions" / str(revision) / "plan.json").read_text())

    def complete(self, client: httpx.Client, **fields) -> httpx.Response:
        body = {"model": "tiny", "prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0, **fields}
        return client.post(self.url("/v1/completions"), json=body, timeout=120)


@pytest.fixture(scope="module")
def deployment(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    deployment = Deployment(tmp_path_factory.mktemp("chaos"), tiny_llama_dir)
    result = deployment.vdeploy("apply", str(deployment.recipe()), "--timeout", WAIT)
    assert result.returncode == 0, result.stdout + result.stderr
    yield deployment
    deployment.vdeploy("delete", NAME, timeout=120)
    leftovers = deployment.processes()
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"processes outlived the deployment: {leftovers}"


def _replica_pids(deployment: Deployment) -> list[int]:
    return [r["pid"] for r in deployment.status()["replicas"] if r["state"] == "ready"]


def test_kill_9_of_a_replica_under_load_fails_no_request(deployment: Deployment) -> None:
    victim = _replica_pids(deployment)[0]
    with Load(deployment.complete) as load:
        wait_until(lambda: len(load.outcomes) >= 8, 60, "some requests before the crash")
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: len(pids := _replica_pids(deployment)) == 2 and victim not in pids,  # one status read
            120,
            "the supervisor to restart the killed replica",
        )
        served = len(load.outcomes)
        wait_until(lambda: len(load.outcomes) >= served + 8, 60, "requests after the restart")
    assert not load.failures(), load.report()
    status = deployment.status()
    assert status["ready"] == 2 and status["restarts"] == 1 and "SIGKILL" in status["last_error"], (
        deployment.diagnosis()
    )


def test_a_hung_replica_is_restarted_and_its_requests_go_elsewhere(deployment: Deployment) -> None:
    """Alive but not answering (SIGSTOP): out of the router after failure_threshold probes, restarted after as many
    more intervals, while the other replica serves every request."""
    victim = _replica_pids(deployment)[0]
    restarts = deployment.status()["restarts"]
    os.kill(victim, signal.SIGSTOP)
    try:
        status = wait_until(
            lambda: (s := deployment.status())["restarts"] > restarts and s["ready"] == 2 and s,
            120,
            "the hung replica to be restarted",
        )
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGCONT)
    assert victim not in _replica_pids(deployment)
    assert any("unhealthy" in (r["last_error"] or "") for r in status["replicas"])
    with httpx.Client() as client:
        assert deployment.complete(client).status_code == 200


def test_two_concurrent_applies_one_killed_mid_rollout_lose_no_update_and_no_request(deployment: Deployment) -> None:
    """The second apply waits for the first (a file lock). The first is killed mid-rollout: its lock dies with it,
    the supervisor (which owns rollouts; apply only asks and waits) finishes the first's revision, then rolls out the
    second's. Both changes land in order, under their own revisions, and no request fails."""
    before = deployment.status()["revision"]
    blue_green = {"strategy": "blue_green"}  # both new replicas start at once: half the time of a rolling update
    with Load(deployment.complete, clients=2) as load:
        first = deployment.start(
            "apply", str(deployment.recipe("a.yaml", memory={"max_num_seqs": 3}, rollout=blue_green)), "--timeout", WAIT
        )
        wait_until(lambda: _revisions(deployment) - {before}, 60, "the first apply's rollout to start")
        second = deployment.start(
            "apply", str(deployment.recipe("b.yaml", memory={"max_num_seqs": 5}, rollout=blue_green)), "--timeout", WAIT
        )
        said: list[str] = []
        reader = threading.Thread(target=lambda: said.extend(second.stderr))
        reader.start()
        wait_until(lambda: any("waiting for it to finish" in line for line in said), 60, "the second apply to wait")
        first.kill()
        first.communicate()
        out = second.stdout.read()
        second.wait(timeout=600)
        reader.join()
    assert second.returncode == 0 and f"rolled out (revision {before + 2})" in out, out + "".join(said)
    assert not load.failures(), load.report()
    log = (deployment.state / "logs" / "supervisor.log").read_text()
    assert log.index(f"revision {before + 1} serving") < log.index(f"revision {before + 2} serving")
    assert [deployment.plan(r)["engine"]["max_num_seqs"] for r in (before + 1, before + 2)] == [3, 5]
    status = deployment.status()
    assert status["revision"] == before + 2 and status["ready"] == 2, deployment.diagnosis()
    expected = {deployment.supervisor_pid(), *(r["pid"] for r in status["replicas"])}
    assert {p.pid for p in deployment.processes()} == expected  # the older revisions' replicas are gone


def test_kill_9_of_the_supervisor_and_router_mid_rollout_then_apply_recovers(deployment: Deployment) -> None:
    """The router lives in the supervisor. Killed mid-rollout, it takes every replica with it (PR_SET_PDEATHSIG);
    requests fail as refused or cut connections, never as a wrong answer; the state stays readable and says what
    happened; the next apply starts a new supervisor that rolls out the revision asked for."""
    before = deployment.status()["revision"]
    recipe = deployment.recipe("kill-supervisor.yaml", memory={"max_num_seqs": 1})
    with Load(deployment.complete, clients=2) as load:
        assert deployment.vdeploy("apply", str(recipe), "--no-wait").returncode == 0
        wait_until(lambda: _revisions(deployment) - {before}, 60, "the new revision's first replica")
        replicas = [r["pid"] for r in deployment.status()["replicas"]]
        served = len(load.outcomes)
        os.kill(deployment.supervisor_pid(), signal.SIGKILL)
        wait_until(lambda: not any(map(live, replicas)), 15, "the replicas to die with their supervisor")
        wait_until(lambda: len(load.outcomes) > served + 8, 30, "requests after the kill")
    assert load.failures() and all(o.status == 0 for o in load.failures()), load.report()
    assert not deployment.processes()
    status = deployment.status()
    assert status["running"] is False and "is gone without stopping the deployment" in status["last_error"]
    assert deployment.vdeploy("rollout", "status", NAME).returncode == 1  # not "complete"
    wanted = json.loads((deployment.state / "desired.json").read_text())["revision"]
    result = deployment.vdeploy("apply", str(recipe), "--timeout", WAIT)
    assert result.returncode == 0 and f"rolled out (revision {wanted})" in result.stdout, result.stdout + result.stderr
    assert deployment.status()["ready"] == 2
    with httpx.Client() as client:
        assert deployment.complete(client).status_code == 200


def _revisions(deployment: Deployment) -> set[int]:
    """The revisions the deployment's replicas run now."""
    return {r["revision"] for r in deployment.status()["replicas"]}


def test_a_failed_first_apply_stops_its_supervisor_and_frees_the_port(tiny_llama_dir: Path, tmp_path: Path) -> None:
    broken = Deployment(tmp_path, tiny_llama_dir, name="chaos-broken")
    recipe = broken.recipe(server={"api_key_env": "VDEPLOY_CHAOS_UNSET_KEY"}, parallelism={"data_parallel_size": 1})
    broken.env.pop("VDEPLOY_CHAOS_UNSET_KEY", None)
    result = broken.vdeploy("apply", str(recipe), "--timeout", WAIT)
    assert result.returncode == 1 and "VDEPLOY_CHAOS_UNSET_KEY" in result.stderr
    wait_until(lambda: not broken.processes(), 30, "the supervisor to exit")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", broken.port))  # the router's port is free again
    status = broken.status()
    assert status["running"] is False and "VDEPLOY_CHAOS_UNSET_KEY" in status["last_error"]
