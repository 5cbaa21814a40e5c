"""Tensor parallelism on the CPU (gloo): a model sharded over 2 or 3 processes generates the same greedy tokens as the
whole model in one, and BERT embeddings are the same."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.fixtures.tiny_models import save_tiny_model
from vdeploy_engine import LLM, SamplingParams
from vdeploy_engine.config import EngineConfig
from vdeploy_engine.pooling import PoolingEngine

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], [100, 3, 250, 17, 9]]


def greedy_tokens(model: str, prompts: list, params: SamplingParams = GREEDY, **engine_args) -> list[list[int]]:
    args = dict(dtype="float32", max_model_len=128, block_size=4, kv_cache_memory_bytes=1 << 20, device="cpu")
    llm = LLM(model, **{**args, **engine_args})
    try:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.llm_engine.shutdown()


@pytest.fixture(scope="module")
def qwen2_one_kv_head(tmp_path_factory) -> str:
    """Qwen2 (q/k/v biases, tied head) with a single KV head: at TP 2 both ranks hold a copy of it."""
    return str(save_tiny_model(tmp_path_factory.mktemp("qwen2-mqa"), "qwen2", num_key_value_heads=1,
                               tie_word_embeddings=True))


def test_qwen2_tp2_with_replicated_kv_head_matches_tp1(qwen2_one_kv_head):
    assert greedy_tokens(qwen2_one_kv_head, PROMPTS, tensor_parallel_size=2) == greedy_tokens(qwen2_one_kv_head,
                                                                                                PROMPTS)


def test_opt_tp2_matches_tp1(tiny_opt_dir):
    want = greedy_tokens(str(tiny_opt_dir), PROMPTS)
    assert greedy_tokens(str(tiny_opt_dir), PROMPTS, tensor_parallel_size=2, distributed_executor_backend="mp") == want


def test_smollm2_gguf_tp3_matches_tp1(smollm2_gguf_path):
    """The real model: 9 query heads and 3 KV heads, one KV head per rank; a vocabulary of 49152 rows split in 3."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    path = str(smollm2_gguf_path)
    args = dict(max_model_len=64, kv_cache_memory_bytes=8 << 20)
    assert greedy_tokens(path, prompts, params, tensor_parallel_size=3, **args) == greedy_tokens(path, prompts,
                                                                                                  params, **args)


def _embeddings(model_dir, sentences: list[str], tp: int) -> torch.Tensor:
    config = EngineConfig(model=str(model_dir), runner="pooling", convert="embed", dtype="float32",
                          tensor_parallel_size=tp)
    engine = PoolingEngine(config)
    try:
        async def embed_all():
            return await asyncio.gather(*(engine.embed(engine.tokenizer.encode(s)) for s in sentences))

        return torch.tensor(asyncio.run(embed_all()))
    finally:
        engine.shutdown()


def test_bert_embeddings_at_tp2_equal_tp1(minilm_dir):
    """all-MiniLM-L6-v2: 12 heads, 6 per rank; the query/key/value, output and MLP layers split in two."""
    sentences = ["The weather is lovely today.", "It is sunny outside!", "He drove to the stadium."]
    torch.testing.assert_close(_embeddings(minilm_dir, sentences, 2), _embeddings(minilm_dir, sentences, 1),
                               atol=1e-5, rtol=1e-4)
