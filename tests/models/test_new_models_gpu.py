"""Gemma 3, Qwen3, Qwen3-MoE and Mixtral on CUDA: greedy decode through captured CUDA graphs (the fused small-batch
path, the Triton MoE kernel inside the graph) gives the tokens of eager execution and of transformers."""

from __future__ import annotations

import gc

import pytest

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 17, 42, 99, 7], [3] * 40, list(range(10, 130))]
MAX_TOKENS = 24


def _greedy(model_dir, **kwargs) -> tuple[list[list[int]], bool]:
    import torch

    from vdeploy_engine import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="float32", gpu_memory_utilization=0.2, max_model_len=256, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    graphs = llm.llm_engine.runner.graphs
    captured = graphs is not None and bool(graphs.graphs)
    del llm, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outputs], captured


@pytest.mark.parametrize("fixture", ["tiny_gemma3_dir", "tiny_qwen3_dir", "tiny_qwen3_moe_dir", "tiny_mixtral_dir"])
def test_cuda_graph_greedy_tokens_match_eager_and_transformers(fixture, request):
    import torch
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    graphed, captured = _greedy(path)
    assert captured, "decode steps should replay CUDA graphs"
    eager, _ = _greedy(path, enforce_eager=True)
    assert graphed == eager
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    for prompt, tokens in zip(PROMPTS, graphed, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        want = hf.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS,
            min_new_tokens=MAX_TOKENS, pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert tokens == want, prompt


def test_fused_moe_kernel_matches_reference_at_real_shapes():
    """Qwen3-30B-A3B's expert shapes in bf16, decode and prefill batch sizes."""
    import torch

    from vdeploy_kernels.moe import fused_moe_ref, fused_moe_triton

    generator = torch.Generator(device="cuda").manual_seed(0)
    experts, hidden, inter, top_k = 128, 2048, 768, 8
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=generator).bfloat16() * 0.02
    w2 = torch.randn(experts, hidden, inter, device="cuda", generator=generator).bfloat16() * 0.02
    for tokens in (1, 7, 300):
        x = torch.randn(tokens, hidden, device="cuda", generator=generator).bfloat16()
        weights, ids = torch.softmax(torch.randn(tokens, experts, device="cuda", generator=generator), -1).topk(top_k)
        weights = (weights / weights.sum(-1, keepdim=True)).bfloat16()
        want = fused_moe_ref(x.float(), w13.float(), w2.float(), weights.float(), ids)
        got = fused_moe_triton(x, w13, w2, weights, ids).float()
        assert (got - want).abs().max() < 2e-2 * want.abs().max(), tokens
