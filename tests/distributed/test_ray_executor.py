"""The `ray` executor: a local Ray cluster, started here as a deployment would start one, runs the ranks of a
tensor-parallel engine as actors of a placement group, with the same greedy tokens as one process; a killed rank ends
the engine with an error naming it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.distributed.test_tensor_parallel import PROMPTS, greedy_tokens
from vdeploy_engine.distributed.executor import free_port

ray = pytest.importorskip("ray", reason="the ray executor's test needs ray (pip install 'vdeploy[ray]')")


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster with 2 logical CPUs (one bundle per worker rank); yields its address."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
               "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
               "--object-store-memory=100000000"]
    subprocess.run(command, check=True, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([command[0], "stop", "--force"], capture_output=True, timeout=120)


def test_tp2_on_ray_actors_matches_one_process(ray_cluster, tiny_qwen2_dir, monkeypatch):
    want = greedy_tokens(str(tiny_qwen2_dir), PROMPTS)
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    try:
        got = greedy_tokens(str(tiny_qwen2_dir), PROMPTS, tensor_parallel_size=2, distributed_executor_backend="ray")
    finally:
        ray.shutdown()
    assert got == want


# An engine at TP 2 on Ray that prints its worker rank's pid, then generates until it is stopped.
ENGINE = textwrap.dedent("""
    import sys
    import ray
    from vdeploy_engine import LLM, SamplingParams
    llm = LLM(sys.argv[1], dtype="float32", max_model_len=128, block_size=4, kv_cache_memory_bytes=1 << 20,
              device="cpu", tensor_parallel_size=2, distributed_executor_backend="ray")
    print(ray.get(llm.llm_engine.executor.actors[1].ping.remote()), flush=True)
    while True:
        llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
""")


def test_a_killed_ray_rank_ends_the_engine_naming_it(ray_cluster, tiny_llama_dir):
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, str(tiny_llama_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_ADDRESS": ray_cluster})
    try:
        worker = int(engine.stdout.readline())
        os.kill(worker, signal.SIGKILL)
        engine.wait(timeout=60)
    finally:
        engine.kill()
    stderr = engine.stderr.read()
    assert engine.returncode == 1, stderr[-3000:]
    assert "ERROR parallel engine: rank 1 (ray actor" in stderr, stderr[-3000:]
