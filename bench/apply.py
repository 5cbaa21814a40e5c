"""`vdeploy apply` benchmark on the CPU quick start: apply-to-ready time, and failed requests during a rollout under
load, each next to a baseline measured in the same run.

    python -m bench.apply --clients 4     # from the repo root; writes bench/results/apply.json

1. Start: `vdeploy apply` of the quick start until it returns (ready behind the router), against the baseline of
   `python -m vdeploy_engine.server` with the same plan started by hand until /health answers; alternated, medians compared.
2. Rollout under load: `--clients` threads send short completions while `vdeploy apply` rolls out a changed recipe,
   against the baseline of restarting the engine by hand on its port. Failed attempts are counted (a refused
   connection is retried after 0.1 s, so the baseline's count measures its downtime).
Goals: apply-to-ready < 15 s, 0 failed requests during the rollout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart-smollm2-cpu.yaml"
NAME = "bench-apply"


class Load:
    """`clients` threads sending short completions in a loop until stopped; counts what failed."""

    def __init__(self, url: str, model: str, clients: int):
        self.url, self.model = url, model
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop) for _ in range(clients)]

    def _loop(self) -> None:
        body = {"model": self.model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                try:
                    reply = client.post(self.url + "/v1/completions", json=body)
                    good = reply.status_code == 200
                    reason = f"HTTP {reply.status_code}"
                except httpx.HTTPError as e:
                    good, reason = False, type(e).__name__
                if good:
                    self.ok += 1
                else:
                    self.failed += 1
                    self.errors.append(reason)
                    time.sleep(0.1)  # a refused connection fails instantly; do not spin

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def summary(self) -> dict:
        return {"requests": self.ok + self.failed, "failed": self.failed, "errors": sorted(set(self.errors))}


def free_port() -> int:
    from vdeploy.supervisor import free_port as pick

    return pick()


def wait_healthy(url: str, timeout: float = 600) -> None:
    started = time.monotonic()
    with httpx.Client(timeout=2) as client:
        while time.monotonic() - started < timeout:
            try:
                if client.get(url + "/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def start_engine(plan_path: Path, port: int, log) -> subprocess.Popen:
    argv = [sys.executable, "-m", "vdeploy_engine.server", "--config", str(plan_path), "--port", str(port)]
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def quickstart_plan(work: Path) -> Path:
    from vdeploy.commands.apply import load_plans

    plans, _ = load_plans(str(QUICKSTART))
    path = work / "plan.json"
    path.write_text(json.dumps(plans[0]))
    return path


def engine_alone_start(plan_path: Path, log) -> float:
    """Seconds from starting the engine by hand to its first healthy answer."""
    port = free_port()
    started = time.monotonic()
    server = start_engine(plan_path, port, log)
    wait_healthy(f"http://127.0.0.1:{port}")
    elapsed = time.monotonic() - started
    server.terminate()
    server.wait()
    return elapsed


def restart_by_hand_under_load(plan_path: Path, log, model: str, clients: int, settle: float) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_engine(plan_path, port, log)
    wait_healthy(url)
    with Load(url, model, clients) as load:
        time.sleep(settle)
        server.terminate()
        server.wait()
        server = start_engine(plan_path, port, log)
        wait_healthy(url)
        time.sleep(settle)
    server.terminate()
    server.wait()
    return load.summary()


class Vdeploy:
    """The quick start under `vdeploy`, in a private state directory."""

    def __init__(self, work: Path):
        self.work = work
        self.env = {**os.environ, "VDEPLOY_STATE_DIR": str(work / "state")}
        self.port = free_port()
        self.recipe = yaml.safe_load(QUICKSTART.read_text())
        self.recipe.update(name=NAME, server={**self.recipe.get("server", {}), "port": self.port})

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "vdeploy.cli", *args], env=self.env, capture_output=True, text=True
        )

    def apply(self, **memory) -> float:
        path = self.work / "recipe.yaml"
        path.write_text(yaml.safe_dump({**self.recipe, "memory": {**self.recipe.get("memory", {}), **memory}}))
        started = time.monotonic()
        result = self.cli("apply", str(path))
        if result.returncode != 0:
            raise RuntimeError(f"vdeploy apply failed: {result.stdout}{result.stderr}")
        return time.monotonic() - started

    def rollout_seconds(self) -> float:
        """The supervisor's own account: from taking the request to the new revision serving."""
        rollout = json.loads((self.work / "state" / NAME / "status.json").read_text())["rollout"]
        return rollout["finished_at"] - rollout["started_at"]

    def delete(self) -> None:
        self.cli("delete", NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients during the rollouts")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of load before and after each change")
    parser.add_argument("--repeats", type=int, default=2, help="start-up measurements of each kind (alternated)")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "apply.json"))
    args = parser.parse_args()
    model = yaml.safe_load(QUICKSTART.read_text())["served_model_name"]
    alone, applied, in_supervisor = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as tmp:
        work = Path(tmp)
        plan_path = quickstart_plan(work)
        ours = Vdeploy(work)
        with open(work / "engine.log", "ab") as log:
            for _ in range(args.repeats):  # alternated, so both see the same background load
                alone.append(engine_alone_start(plan_path, log))
                try:
                    applied.append(ours.apply())
                    in_supervisor.append(ours.rollout_seconds())
                finally:
                    ours.delete()
            by_hand = restart_by_hand_under_load(plan_path, log, model, args.clients, args.settle)
        try:
            ours.apply()
            with Load(f"http://127.0.0.1:{ours.port}", model, args.clients) as load:
                time.sleep(args.settle)
                rollout_s = ours.apply(max_num_seqs=2)
                time.sleep(args.settle)
        finally:
            ours.delete()
    apply_s, alone_s = statistics.median(applied), statistics.median(alone)
    result = {
        "command": "python -m bench.apply " + shlex.join(sys.argv[1:]),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "recipe": str(QUICKSTART.relative_to(REPO)),
        "start": {
            "apply_to_ready_s": [round(x, 2) for x in applied],
            "of_which_supervisor_rollout_s": [round(x, 2) for x in in_supervisor],
            "baseline_engine_alone_s": [round(x, 2) for x in alone],
            "apply_over_engine_alone": round(apply_s / alone_s, 2),
        },
        "rollout_under_load": {
            "vdeploy_apply": {**load.summary(), "seconds": round(rollout_s, 2)},
            "baseline_restart_by_hand": by_hand,
        },
        "goals": {
            "apply_to_ready_under_15s": apply_s < 15,
            "zero_failed_requests_during_rollout": load.failed == 0,
        },
    }
    print(json.dumps(result, indent=2))
    print(
        f"apply-to-ready {apply_s:.1f}s (median) vs engine alone {alone_s:.1f}s: ratio "
        f"{result['start']['apply_over_engine_alone']:.2f}; failed requests during a rollout: {load.failed}/"
        f"{load.ok + load.failed} with vdeploy vs {by_hand['failed']}/{by_hand['requests']} restarting by hand"
    )
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
