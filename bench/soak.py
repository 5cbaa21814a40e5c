"""Soak: a `vdeploy apply` deployment of the CPU quick start under mixed traffic at twice its measured capacity, with
clients that disconnect, long enough to show a leak: the memory of every process over time, and every KV block
returned once the traffic stops.

    python -m bench.soak                  # from the repo root: ~6 minutes (the soak compressed to 4 minutes)
    python -m bench.soak --minutes 60     # the full hour

1. Capacity (the baseline, same run): closed-loop clients, as many as the deployment runs sequences at once, send
   plain completions for `--probe-s` seconds; capacity = completions per second.
2. Soak: requests arrive at random (Poisson) at `--overload` x capacity for `--minutes`, each of a kind drawn from
   MIX: plain and sampled (n=2) completions, streamed chats read to the end, streams the client cuts after two events,
   impatient clients that give up after a second, and poison requests that must get a 400. A client gives up on any
   request after `--client-timeout` s (at 2x capacity the queue grows until such clients leave): every give-up is a
   disconnect the server must clean up after.
3. Every `--sample-s` s the resident memory of the supervisor (which holds the router; without its children, the
   replicas) and of each replica (with its children) is recorded. After the first quarter (warm-up), memory must stay flat: the growth from the start to the
   end of the rest is reported per process, in MiB and as a ratio.
4. When the traffic stops and the last clients are gone, each replica's /metrics must show no request running or
   waiting and no KV block in use.
The run fails (exit 1) on a 5xx, a refused or cut connection the client did not cause, a poison request not refused
with a 400, a replica restart, memory that grows by more than FLAT_RATIO, or a KV block left in use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart-smollm2-cpu.yaml"
NAME = "bench-soak"
FLAT_RATIO = 1.05  # end / start resident memory after the warm-up, per process
MIX = {  # kind: weight
    "complete": 35,
    "sampled_n2": 10,
    "chat_stream": 20,
    "stream_cut": 15,
    "impatient": 10,
    "poison": 10,
}
POISON = [  # bodies for /v1/completions that must get a 400
    {"prompt": "Hi", "max_tokens": 4, "seed": 2**64, "temperature": 1},
    {"prompt": "Hi", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": [10**9]},
    {"prompt": [1, 2, 10**9], "max_tokens": 4},
    {"prompt": "Hi", "max_tokens": 4, "logit_bias": {"1000000000": 5}},
    {"prompt": "Hi \ud800", "max_tokens": 4},
]


class Deployment:
    """The quick start under `vdeploy apply` in a private state directory, with `replicas` replicas."""

    def __init__(self, work: Path, replicas: int):
        from vdeploy.supervisor import free_port

        self.work, self.port = work, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "VDEPLOY_STATE_DIR": str(work / "state")}
        self.recipe = yaml.safe_load(QUICKSTART.read_text())
        self.recipe.update(name=NAME, server={**self.recipe.get("server", {}), "port": self.port})
        self.recipe["parallelism"] = {"data_parallel_size": replicas}
        self.model = self.recipe["served_model_name"]

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "vdeploy.cli", *args]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, cwd=REPO)

    def apply(self) -> None:
        path = self.work / "recipe.yaml"
        path.write_text(yaml.safe_dump(self.recipe))
        result = self.cli("apply", str(path), "--timeout", "600")
        if result.returncode != 0:
            raise RuntimeError(f"vdeploy apply failed: {result.stdout}{result.stderr}")

    def status(self) -> dict:
        return json.loads((self.work / "state" / NAME / "status.json").read_text())

    def max_num_seqs(self) -> int:
        plan = json.loads((self.work / "state" / NAME / "revisions" / "1" / "plan.json").read_text())
        return int(plan["engine"]["max_num_seqs"]) * int(plan.get("replicas", 1))


# ------------------------------------------------------------------------------------------------------- traffic


def completion(model: str, rng: random.Random, **fields) -> dict:
    return {"model": model, "prompt": "Write a short story about a robot.", "max_tokens": rng.randint(8, 32), **fields}


async def send(client: httpx.AsyncClient, url: str, kind: str, model: str, rng: random.Random) -> tuple[str, float]:
    """One request of `kind`; returns (outcome, seconds). Outcomes: ok, cut (the client closed a stream on purpose),
    gave_up (the client's patience ran out: a disconnect), refused (a 4xx), or what went wrong (HTTP 5xx, error)."""
    started = time.monotonic()
    if kind == "poison":
        body = json.dumps({"model": model, **rng.choice(POISON)})  # escapes the lone surrogate (httpx's json= cannot)
        reply = await client.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        return ("refused" if reply.status_code == 400 else f"poison got HTTP {reply.status_code}"), 0.0
    if kind in ("chat_stream", "stream_cut"):
        body = {"model": model, "messages": [{"role": "user", "content": "Tell me about the sea."}], "stream": True}
        body["max_tokens"] = rng.randint(8, 32)
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                return f"HTTP {reply.status_code}", 0.0
            events = 0
            async for line in reply.aiter_lines():
                events += line.startswith("data: ")
                if kind == "stream_cut" and events == 2:
                    return "cut", time.monotonic() - started  # leaving the block closes the connection mid-stream
            return ("ok" if events >= 2 else "short stream"), time.monotonic() - started
    fields = {"n": 2, "temperature": 0.8, "seed": rng.randrange(2**31)} if kind == "sampled_n2" else {"temperature": 0}
    reply = await client.post(url + "/v1/completions", json=completion(model, rng, **fields))
    if reply.status_code != 200:
        return f"HTTP {reply.status_code}", 0.0
    return ("ok" if len(reply.json()["choices"]) == fields.get("n", 1) else "wrong answer"), time.monotonic() - started


async def attempt(client, url, kind, model, rng, patience: float, outcomes: Counter, latencies: list) -> None:
    try:
        async with asyncio.timeout(1.0 if kind == "impatient" else patience):
            outcome, seconds = await send(client, url, kind, model, rng)
    except TimeoutError:
        outcome, seconds = "gave_up", 0.0
    except httpx.HTTPError as e:
        outcome, seconds = f"error {type(e).__name__}", 0.0
    outcomes[(kind, outcome)] += 1
    if outcome == "ok" and kind == "complete":
        latencies.append(seconds)


async def closed_loop(url: str, model: str, clients: int, seconds: float) -> float:
    """Plain completions from `clients` clients that each wait for their answer: completions per second."""
    rng, done = random.Random(1), 0
    deadline = time.monotonic() + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            reply = await client.post(url + "/v1/completions", json=completion(model, rng, temperature=0))
            reply.raise_for_status()
            done += 1

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return done / (time.monotonic() - started)


async def open_loop(url: str, model: str, rate: float, seconds: float, patience: float, seed: int) -> dict:
    """Poisson arrivals at `rate`/s for `seconds`, kinds drawn from MIX; waits for (or gives up on) the last ones."""
    rng = random.Random(seed)
    kinds, weights = list(MIX), list(MIX.values())
    outcomes: Counter = Counter()
    latencies: list[float] = []
    tasks: set[asyncio.Task] = set()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10), limits=limits) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            task = asyncio.create_task(attempt(client, url, kind, model, rng, patience, outcomes, latencies))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)  # each ends within `patience`
    latencies.sort()
    return {
        "requests": sum(outcomes.values()),
        "outcomes": {f"{kind}: {outcome}": n for (kind, outcome), n in sorted(outcomes.items())},
        "complete_latency_s": {
            "p50": round(statistics.median(latencies), 3) if latencies else None,
            "p90": round(latencies[int(0.9 * (len(latencies) - 1))], 3) if latencies else None,
        },
        "unexpected": {
            f"{kind}: {outcome}": n
            for (kind, outcome), n in outcomes.items()
            if outcome not in ("ok", "cut", "gave_up", "refused") or (outcome == "refused") != (kind == "poison")
        },
    }


# ------------------------------------------------------------------------------------------------------ watching


def rss(pid: int, children: bool) -> int | None:
    """Resident bytes of `pid`, with its children's when `children` (the supervisor's children are the replicas)."""
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *(process.children(recursive=True) if children else [])])
    except psutil.Error:
        return None


class MemoryWatch:
    """Samples the resident memory of the supervisor and of each replica (by index) every `every` s."""

    def __init__(self, deployment: Deployment, every: float):
        self.deployment, self.every = deployment, every
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            status = self.deployment.status()
            sample = {"supervisor": rss(status["supervisor_pid"], children=False)}
            for r in status["replicas"]:
                sample[f"replica {r['index']} (rev {r['revision']})"] = rss(r["pid"], children=True) if r["pid"] else None
            sample = {name: value for name, value in sample.items() if value is not None}
            self.samples.append((time.monotonic() - self.started, sample))

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, warm_s: float) -> dict:
        """Per process: MiB at the end of the warm-up and at the end (medians of the first and last tenth of the
        samples after it), their ratio, and the least-squares slope in MiB per hour."""
        after = [(t, s) for t, s in self.samples if t >= warm_s]
        result = {}
        for name in sorted({n for _, s in after for n in s}):
            points = [(t, s[name] / 2**20) for t, s in after if name in s]
            if len(points) < 4:
                continue
            tenth = max(1, len(points) // 10)
            start = statistics.median(m for _, m in points[:tenth])
            end = statistics.median(m for _, m in points[-tenth:])
            slope = statistics.linear_regression([t for t, _ in points], [m for _, m in points]).slope * 3600
            result[name] = {
                "start_mib": round(start, 1),
                "end_mib": round(end, 1),
                "end_over_start": round(end / start, 4),
                "slope_mib_per_hour": round(slope, 1),
                "samples": len(points),
            }
        return result


def replica_metrics(url: str) -> dict[str, float]:
    wanted = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def blocks_returned(deployment: Deployment, timeout: float = 60) -> dict:
    """Each replica's running, waiting and KV usage once idle (waits up to `timeout` s for them to reach 0)."""
    deadline = time.monotonic() + timeout
    while True:
        replicas = {f"replica {r['index']}": r["port"] for r in deployment.status()["replicas"]}
        seen = {name: replica_metrics(f"http://127.0.0.1:{port}") for name, port in replicas.items()}
        idle = all(not any(v.values()) for v in seen.values())
        if idle or time.monotonic() > deadline:
            return {"idle": idle, "replicas": seen}
        time.sleep(1)


# ---------------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="soak length (default 4: compressed; 60: the hour)")
    parser.add_argument("--replicas", type=int, default=2, help="replicas behind the router (default 2)")
    parser.add_argument("--overload", type=float, default=2.0, help="offered load over measured capacity")
    parser.add_argument("--probe-s", type=float, default=30.0, help="seconds of the capacity probe")
    parser.add_argument("--client-timeout", type=float, default=30.0, help="seconds a client waits before leaving")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "soak-cpu.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        deployment = Deployment(Path(tmp), args.replicas)
        deployment.apply()
        try:
            clients = deployment.max_num_seqs()
            print(f"capacity probe: {clients} closed-loop clients for {args.probe_s:.0f}s", flush=True)
            capacity = asyncio.run(closed_loop(deployment.url, deployment.model, clients, args.probe_s))
            rate = args.overload * capacity
            print(f"capacity {capacity:.2f} completions/s; soak at {rate:.2f} requests/s for {args.minutes} min")
            seconds = args.minutes * 60
            with MemoryWatch(deployment, args.sample_s) as memory:
                traffic = asyncio.run(
                    open_loop(deployment.url, deployment.model, rate, seconds, args.client_timeout, args.seed)
                )
            kv = blocks_returned(deployment)
            restarts = sum(r["restarts"] for r in deployment.status()["replicas"])
        finally:
            deployment.cli("delete", NAME)
    mem = memory.summary(warm_s=seconds / 4)
    grown = {name: m["end_over_start"] for name, m in mem.items() if m["end_over_start"] > FLAT_RATIO}
    verdict = {
        "unexpected_outcomes": traffic["unexpected"],
        "replica_restarts": restarts,
        "memory_grown_past_flat_ratio": grown,
        "kv_blocks_all_returned": kv["idle"],
    }
    ok = not traffic["unexpected"] and not restarts and not grown and kv["idle"]
    result = {
        "command": "python -m bench.soak " + shlex.join(sys.argv[1:]),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "load_avg_1m": [load_before, os.getloadavg()[0]]},
        "recipe": str(QUICKSTART.relative_to(REPO)),
        "replicas": args.replicas,
        "minutes": args.minutes,
        "capacity_completions_per_s": round(capacity, 3),
        "offered_requests_per_s": round(rate, 3),
        "offered_over_capacity": args.overload,
        "mix": MIX,
        "client_timeout_s": args.client_timeout,
        "traffic": traffic,
        "memory_after_warmup": mem,
        "flat_ratio": FLAT_RATIO,
        "kv_after_traffic": kv,
        "verdict": verdict,
        "passed": ok,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("traffic", "memory_after_warmup", "verdict", "passed")}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
