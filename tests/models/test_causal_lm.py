"""Engine models against transformers on the tiny random checkpoints: the same logits, with no KV cache (several
sequences in one flat batch) and over a paged KV cache through prefill and decode steps."""

from __future__ import annotations

import pytest
import torch

from tests.models.harness import PagedRun, forward_no_cache, load_engine_model, reference_logits

FIXTURES = [
    "tiny_llama_dir", "tiny_qwen2_dir", "tiny_qwen3_dir", "tiny_mistral_dir", "tiny_gemma3_dir", "tiny_opt_dir",
    "tiny_qwen3_moe_dir", "tiny_mixtral_dir",
]
ATOL = 1e-4  # float32; logits are O(5)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_logits_match_transformers_in_one_flat_batch(fixture, prompts, request):
    path = request.getfixturevalue(fixture)
    ours = forward_no_cache(load_engine_model(path), prompts)
    for got, want in zip(ours, reference_logits(path, prompts), strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_paged_prefill_then_decode_matches_transformers(fixture, prompts, request):
    path = request.getfixturevalue(fixture)
    model = load_engine_model(path)
    decode_steps = 4
    run = PagedRun(model, num_seqs=len(prompts), max_len=max(map(len, prompts)))
    # Prefill all but the last `decode_steps` tokens in two chunks (the second one reads the first from the cache),
    # then feed the rest one token per step.
    prefix = [p[:-decode_steps] for p in prompts]
    half = [len(p) // 2 for p in prefix]
    run.step([p[:h] for p, h in zip(prefix, half, strict=True)])
    got = [run.step([p[h:] for p, h in zip(prefix, half, strict=True)])]
    for i in range(decode_steps - 1):
        got.append(run.step([[p[-decode_steps + i]] for p in prompts], decode=True))
    want = reference_logits(path, prompts)
    for step, logits in enumerate(got):
        for seq, row in enumerate(logits):
            position = len(prompts[seq]) - decode_steps - 1 + step
            torch.testing.assert_close(row, want[seq][position], atol=ATOL, rtol=0)


def test_sliding_window_changes_what_mistral_sees(tiny_mistral_dir, prompts):
    """The fixture's window (4) is shorter than the prompt: without it the late logits would differ."""
    model = load_engine_model(tiny_mistral_dir)
    windowed = forward_no_cache(model, prompts[:1])[0]
    for layer in model.model.layers:
        layer.self_attn.attn.sliding_window = None
    full = forward_no_cache(model, prompts[:1])[0]
    torch.testing.assert_close(windowed[:4], full[:4], atol=ATOL, rtol=0)  # within the window: identical
    assert (windowed[-1] - full[-1]).abs().max() > 0.1


def test_tied_embeddings_share_one_tensor(tiny_qwen2_dir, tiny_opt_dir, tiny_llama_dir):
    for path in (tiny_qwen2_dir, tiny_opt_dir):
        model = load_engine_model(path)
        embedding = (
            model.model.embed_tokens if hasattr(model.model, "embed_tokens") else model.model.decoder.embed_tokens
        )
        assert model.lm_head.weight.data_ptr() == embedding.weight.data_ptr()
    untied = load_engine_model(tiny_llama_dir)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("overrides", [{"do_layer_norm_before": False}, {"word_embed_proj_dim": 32}])
def test_opt_variants_match_transformers(overrides, prompts, tmp_path):
    """Post-LayerNorm blocks (opt-350m) and an embedding narrower than the hidden size (projected in and out)."""
    from tests.fixtures.tiny_models import save_tiny_model

    path = save_tiny_model(tmp_path, "opt", **overrides)
    for got, want in zip(
        forward_no_cache(load_engine_model(path), prompts), reference_logits(path, prompts), strict=True
    ):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_bfloat16_load_runs_in_bfloat16_and_stays_close(tiny_llama_dir, prompts):
    model = load_engine_model(tiny_llama_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    got = forward_no_cache(model, prompts[:1])[0]
    want = reference_logits(tiny_llama_dir, prompts[:1])[0]
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.25
    assert (got.float().argmax(-1) == want.argmax(-1)).float().mean() > 0.8
