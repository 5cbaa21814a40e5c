"""A tensor- or pipeline-parallel engine whose rank dies or hangs ends with an error naming the rank within seconds,
and leaves no process behind; a worker whose engine dies exits by itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from vdeploy_engine.distributed.executor import HANG_SECONDS

# An engine at TP 2 (or PP 2: argv[2] names the size) that prints its worker's pid, then generates until stopped.
ENGINE = textwrap.dedent("""
    import sys
    from vdeploy_engine import LLM, SamplingParams
    llm = LLM(sys.argv[1], dtype="float32", max_model_len=128, block_size=4, kv_cache_memory_bytes=1 << 20,
              device="cpu", **{sys.argv[2]: 2})
    print(llm.llm_engine.executor.workers[1].pid, flush=True)
    while True:
        llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
""")


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize(
    ("layout", "signal_to_worker", "reason", "within"),
    [
        ("tensor_parallel_size", signal.SIGKILL, "rank 1 .* exited with code -9", 10),
        ("tensor_parallel_size", signal.SIGSTOP, "rank 1 .* stopped responding", HANG_SECONDS + 10),
        ("pipeline_parallel_size", signal.SIGKILL, "rank 1 .* exited with code -9", 10),
    ],
    ids=["tp-killed", "tp-hung", "pp-stage-killed"],
)
def test_a_dead_or_hung_rank_ends_the_engine_naming_it(tiny_llama_dir, layout, signal_to_worker, reason, within):
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, str(tiny_llama_dir), layout], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        worker = int(engine.stdout.readline())
        time.sleep(1)  # some steps run
        os.kill(worker, signal_to_worker)
        started = time.monotonic()
        engine.wait(timeout=within + 30)
        took = time.monotonic() - started
    finally:
        engine.kill()
    stderr = engine.stderr.read()
    assert engine.returncode == 1
    assert took < within, f"the engine took {took:.1f} s to stop"
    assert re.search(f"ERROR parallel engine: {reason}", stderr), stderr[-2000:]
    assert _gone(worker, within=5), "the worker outlived its engine"


def test_a_worker_exits_when_its_engine_is_killed(tiny_llama_dir):
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, str(tiny_llama_dir), "tensor_parallel_size"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        worker = int(engine.stdout.readline())
    finally:
        engine.kill()
        engine.wait()
    assert _gone(worker, within=5), "the worker outlived its engine"
