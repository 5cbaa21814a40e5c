"""The whole engine on CUDA: decode through captured CUDA graphs gives the tokens eager execution and transformers give,
and start-up measures memory the way the plan predicts it."""

from __future__ import annotations

import gc

import pytest

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 17, 42, 99, 7], [3] * 40, list(range(10, 130))]


def _greedy(model_dir, **kwargs) -> tuple[list[list[int]], dict]:
    """Greedy tokens for PROMPTS, and what start-up measured. The engine is freed before returning: a live one's KV
    cache would count as memory outside the next engine's reach."""
    import torch

    from engine import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="float32", gpu_memory_utilization=0.2, max_model_len=256, **kwargs)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    runner = llm.llm_engine.runner
    facts = dict(
        graphs=runner.graphs is not None and bool(runner.graphs.graphs),
        measured=dict(runner.measured),
        predicted=dict(runner.config.predicted_memory),
    )
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outputs], facts


def test_cuda_graph_decode_matches_eager_and_transformers(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    graphed, facts = _greedy(tiny_llama_dir)
    assert facts["graphs"], "decode steps should replay CUDA graphs"
    assert facts["measured"]["cuda_graph_bytes"] > 0
    eager, eager_facts = _greedy(tiny_llama_dir, enforce_eager=True)
    assert not eager_facts["graphs"]
    assert graphed == eager

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).cuda().eval()
    for prompt, tokens in zip(PROMPTS, graphed, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        want = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=24,
            min_new_tokens=24,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert tokens == want


def test_startup_measures_memory_within_the_plan(tiny_llama_dir):
    _, facts = _greedy(tiny_llama_dir)
    measured, predicted = facts["measured"], facts["predicted"]
    assert set(measured) >= {"weights_bytes", "activation_bytes", "overhead_bytes", "kv_cache_bytes"}
    assert measured["kv_cache_bytes"] <= predicted["kv_cache_bytes"]
    assert measured["weights_bytes"] > 0
