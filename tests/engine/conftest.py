"""Engine test fixtures: an LLM on the tiny random Llama (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from vdeploy_engine import LLM


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny models are all synchronisation overhead with several threads, worse on a shared CI box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def make_llm(tiny_llama_dir):
    def make(**kwargs) -> LLM:
        args = dict(dtype="float32", max_model_len=128, block_size=4, kv_cache_memory_bytes=1 << 20)
        return LLM(str(tiny_llama_dir), **{**args, **kwargs})

    return make
