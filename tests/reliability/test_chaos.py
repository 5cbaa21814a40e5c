"""Chaos against a real deployment (`vdeploy apply`: supervisor, router, two engine replicas of the tiny model on the
CPU): kill -9 of a replica under load, a replica that hangs, two applies at once, a failed first apply. Requests are
counted; where the router can retry, none may fail; no process outlives its deployment; the state stays readable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from vdeploy.supervisor import free_port

pytestmark = pytest.mark.slow

NAME = "chaos"
WAIT = "240"


class Deployment:
    """A private state directory, a recipe over the tiny model, and the vdeploy CLI run against them."""

    def __init__(self, root: Path, model_dir: Path, name: str = NAME):
        self.root, self.name, self.port = root, name, free_port()
        self.env = {**os.environ, "VDEPLOY_STATE_DIR": str(root / "state")}
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

    def vdeploy(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "vdeploy.cli", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "vdeploy.cli", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def status(self) -> dict:
        result = self.vdeploy("status", self.name, "--format", "json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def complete(self, client: httpx.Client, **fields) -> httpx.Response:
        body = {"model": "tiny", "prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0, **fields}
        return client.post(f"http://127.0.0.1:{self.port}/v1/completions", json=body, timeout=120)

    def diagnosis(self) -> str:
        """What to read when a chaos test fails: the status and the supervisor's log."""
        log = self.root / "state" / self.name / "logs" / "supervisor.log"
        tail = log.read_text(errors="replace")[-6000:] if log.exists() else "(no supervisor log)"
        return f"status: {self.vdeploy('status', self.name, '--format', 'json').stdout}\nsupervisor log:\n{tail}"

    def processes(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            try:
                cmdline = " ".join(proc.info["cmdline"] or [])
                mine = str(self.root / "state") in cmdline or f"vdeploy.supervisor {self.name}" in cmdline
                if mine and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.Error:
                continue
        return found


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Load:
    """Clients sending completions in a loop until stopped; every outcome is counted."""

    def __init__(self, deployment: Deployment, clients: int = 4, stream: bool = False):
        self.deployment, self.stream, self.outcomes = deployment, stream, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop) for _ in range(clients)]

    def _loop(self) -> None:
        with httpx.Client() as client:
            while not self.stop.is_set():
                try:
                    reply = self.deployment.complete(client)
                    ok = reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
                    self.outcomes.append((reply.status_code, reply.text[:200] if not ok else ""))
                except httpx.HTTPError as e:
                    self.outcomes.append((0, repr(e)))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def failures(self) -> list:
        return [o for o in self.outcomes if o[0] != 200 or o[1]]


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
    with Load(deployment) as load:
        wait_until(lambda: len(load.outcomes) >= 8, 60, "some requests before the crash")
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: len(_replica_pids(deployment)) == 2 and victim not in _replica_pids(deployment),
            120,
            "the supervisor to restart the killed replica",
        )
        served = len(load.outcomes)
        wait_until(lambda: len(load.outcomes) >= served + 8, 60, "requests after the restart")
    assert not load.failures(), f"{len(load.failures())} of {len(load.outcomes)} failed: {load.failures()[:3]}"
    status = deployment.status()
    assert status["ready"] == 2 and status["restarts"] == 1 and "SIGKILL" in status["last_error"], deployment.diagnosis()


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


def test_two_concurrent_applies_lose_no_update(deployment: Deployment) -> None:
    """Both changes are rolled out one after the other, under their own revision numbers, and the second apply
    compares against what the first rolled out."""
    before = deployment.status()["revision"]
    first = deployment.start("apply", str(deployment.recipe("a.yaml", memory={"max_num_seqs": 3})), "--timeout", WAIT)
    time.sleep(0.5)
    second = deployment.start("apply", str(deployment.recipe("b.yaml", memory={"max_num_seqs": 5})), "--timeout", WAIT)
    outputs = [process.communicate(timeout=600) for process in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert f"rolled out (revision {before + 1})" in outputs[0][0]
    assert f"rolled out (revision {before + 2})" in outputs[1][0]
    assert "waiting for it to finish" in outputs[1][1]  # it said why it waited
    state = deployment.root / "state" / NAME
    plans = {r: json.loads((state / "revisions" / str(r) / "plan.json").read_text()) for r in (before + 1, before + 2)}
    assert [plans[r]["engine"]["max_num_seqs"] for r in sorted(plans)] == [3, 5]
    assert deployment.status()["revision"] == before + 2


def test_a_failed_first_apply_stops_its_supervisor_and_frees_the_port(tiny_llama_dir: Path, tmp_path: Path) -> None:
    broken = Deployment(tmp_path, tiny_llama_dir, name="chaos-broken")
    recipe = broken.recipe(server={"api_key_env": "VDEPLOY_CHAOS_UNSET_KEY"}, parallelism={"data_parallel_size": 1})
    broken.env.pop("VDEPLOY_CHAOS_UNSET_KEY", None)
    result = broken.vdeploy("apply", str(recipe), "--timeout", WAIT)
    assert result.returncode == 1 and "VDEPLOY_CHAOS_UNSET_KEY" in result.stderr
    wait_until(lambda: not broken.processes(), 30, "the supervisor to exit")
    with __import__("socket").socket() as probe:
        probe.bind(("127.0.0.1", broken.port))  # the router's port is free again
    status = broken.status()
    assert status["running"] is False and "VDEPLOY_CHAOS_UNSET_KEY" in status["last_error"]
