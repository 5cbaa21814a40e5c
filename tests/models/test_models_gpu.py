"""The engine models on CUDA, where every kernels.* call takes its Triton path, against transformers on the CPU."""

from __future__ import annotations

import pytest

from tests.models.harness import PagedRun, forward_no_cache, load_engine_model, reference_logits

pytestmark = pytest.mark.gpu
FIXTURES = [
    "tiny_llama_dir", "tiny_qwen2_dir", "tiny_qwen3_dir", "tiny_mistral_dir", "tiny_gemma3_dir", "tiny_opt_dir",
    "tiny_qwen3_moe_dir", "tiny_mixtral_dir",
]


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("dtype, atol", [("float32", 2e-2), ("bfloat16", 0.3)])
def test_cuda_model_matches_transformers(fixture, dtype, atol, prompts, request):
    path = request.getfixturevalue(fixture)
    model = load_engine_model(path, dtype=dtype, device="cuda")
    want = reference_logits(path, prompts)
    for got, ref in zip(forward_no_cache(model, prompts), want, strict=True):
        assert (got.float().cpu() - ref).abs().max() < atol
    run = PagedRun(model, num_seqs=len(prompts), max_len=max(map(len, prompts)))
    run.step([p[:-1] for p in prompts])
    last = run.step([[p[-1]] for p in prompts], decode=True).float().cpu()
    for row, ref in zip(last, want, strict=True):
        assert (row - ref[-1]).abs().max() < atol
