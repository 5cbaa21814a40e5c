"""`vdeploy apply` benchmark on the CPU quick start: apply-to-ready time, and failed requests during a rollout under
load, each next to a baseline measured in the same run.

    python -m bench.apply --clients 4     # from the repo root; writes bench/results/apply.json

1. Baseline start: `python -m engine.server` with the quick start's plan, started by hand, until /health answers.
   Baseline restart: the same server under load, stopped and started again on its port (a deploy without vdeploy);
   requests failed meanwhile are counted.
2. vdeploy: `vdeploy apply` of the quick start until it returns (ready behind the router); then, with the same load,
   `vdeploy apply` of a changed recipe (a new revision); failed requests are counted. Goals: apply-to-ready < 15 s,
   0 failed requests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
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


def wait_healthy(url: str, timeout: float = 600) -> float:
    started = time.monotonic()
    with httpx.Client(timeout=2) as client:
        while time.monotonic() - started < timeout:
            try:
                if client.get(url + "/health").status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def start_engine(plan_path: Path, port: int, log) -> subprocess.Popen:
    argv = [sys.executable, "-m", "engine.server", "--config", str(plan_path), "--port", str(port)]
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def baseline(work: Path, model: str, clients: int, settle: float) -> dict:
    """The engine started by hand, then restarted by hand under load."""
    from vdeploy.commands.apply import load_plans

    plans, _ = load_plans(str(QUICKSTART))
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plans[0]))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(work / "baseline.log", "ab") as log:
        server = start_engine(plan_path, port, log)
        ready_s = wait_healthy(url)
        with Load(url, model, clients) as load:
            time.sleep(settle)
            server.terminate()
            server.wait()
            server = start_engine(plan_path, port, log)
            wait_healthy(url)
            time.sleep(settle)
        server.terminate()
        server.wait()
    return {"engine_start_to_ready_s": round(ready_s, 2), "restart_under_load": load.summary()}


def with_vdeploy(work: Path, model: str, clients: int, settle: float) -> dict:
    env = {**os.environ, "VDEPLOY_STATE_DIR": str(work / "state")}
    port = free_port()
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe.update(name=NAME, server={**recipe.get("server", {}), "port": port})

    def apply(**memory) -> tuple[float, subprocess.CompletedProcess]:
        path = work / "recipe.yaml"
        path.write_text(yaml.safe_dump({**recipe, "memory": {**recipe.get("memory", {}), **memory}}))
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "vdeploy.cli", "apply", str(path)], env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"vdeploy apply failed: {result.stdout}{result.stderr}")
        return time.monotonic() - started, result

    try:
        ready_s, _ = apply()
        with Load(f"http://127.0.0.1:{port}", model, clients) as load:
            time.sleep(settle)
            rollout_s, _ = apply(max_num_seqs=2)
            time.sleep(settle)
    finally:
        subprocess.run([sys.executable, "-m", "vdeploy.cli", "delete", NAME], env=env, capture_output=True)
    return {
        "apply_to_ready_s": round(ready_s, 2),
        "rollout_s": round(rollout_s, 2),
        "rollout_under_load": load.summary(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients during the rollouts")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of load before and after each change")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "apply.json"))
    args = parser.parse_args()
    model = yaml.safe_load(QUICKSTART.read_text())["served_model_name"]
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as tmp:
        work = Path(tmp)
        base = baseline(work, model, args.clients, args.settle)
        ours = with_vdeploy(work, model, args.clients, args.settle)
    result = {
        "command": "python -m bench.apply " + shlex.join(sys.argv[1:]),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "recipe": str(QUICKSTART.relative_to(REPO)),
        "baseline": base,
        "vdeploy": ours,
        "apply_overhead_ratio": round(ours["apply_to_ready_s"] / base["engine_start_to_ready_s"], 2),
        "goals": {
            "apply_to_ready_under_15s": ours["apply_to_ready_s"] < 15,
            "zero_failed_requests_during_rollout": ours["rollout_under_load"]["failed"] == 0,
        },
    }
    print(json.dumps(result, indent=2))
    print(
        f"apply-to-ready {ours['apply_to_ready_s']:.1f}s vs engine alone {base['engine_start_to_ready_s']:.1f}s "
        f"(ratio {result['apply_overhead_ratio']:.2f}); failed requests: rollout "
        f"{ours['rollout_under_load']['failed']}/{ours['rollout_under_load']['requests']} vs restart by hand "
        f"{base['restart_under_load']['failed']}/{base['restart_under_load']['requests']}"
    )
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
