"""RoPE scaling: our cos/sin cache against transformers' own rotary embedding for each rope type, and a whole model
with scaled RoPE against transformers."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.fixtures.tiny_models import save_tiny_model
from tests.models.harness import forward_no_cache, load_engine_model, reference_logits
from vdeploy_engine.layers.rotary import build_cos_sin_cache, rope_parameters

HEAD_DIM = 16
ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    # Original context 32: wavelengths of a 16-dim head span both thresholds, so all three llama3 bands occur.
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 16,
    },
}


def _config(params: dict) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=4 * HEAD_DIM, num_attention_heads=4, max_position_embeddings=256, rope_parameters=dict(params)
    )


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_cos_sin_cache_matches_transformers_rotary(case):
    config = _config(ROPE_CASES[case])
    cache = build_cos_sin_cache(HEAD_DIM, config.max_position_embeddings, rope_parameters(config))
    positions = torch.arange(cache.shape[0])[None]
    hf_rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    cos, sin = hf_rotary(torch.zeros(1, dtype=torch.float32), positions)  # covers the whole cache: dynamic's length
    half = HEAD_DIM // 2
    torch.testing.assert_close(cache[:, :half], cos[0, :, :half], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[:, half:], sin[0, :, :half], atol=1e-5, rtol=1e-5)


def test_scaled_rope_reaches_past_the_original_context():
    """Scaling exists to serve longer sequences: the cache covers original length x factor."""
    for case, length in (("linear", 1024), ("dynamic", 512), ("yarn", 256), ("llama3", 256)):
        config = _config(ROPE_CASES[case])
        assert build_cos_sin_cache(HEAD_DIM, 256, rope_parameters(config)).shape[0] == length, case


def test_transformers_4_style_rope_scaling_is_read():
    class Legacy:  # what a transformers 4.x config object carries
        rope_theta = 500000.0
        rope_scaling = {"type": "linear", "factor": 2.0}

    assert rope_parameters(Legacy()) == {"type": "linear", "factor": 2.0, "rope_theta": 500000.0, "rope_type": "linear"}


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="longrope"):
        build_cos_sin_cache(HEAD_DIM, 64, {"rope_type": "longrope", "rope_theta": 10000.0})


@pytest.mark.parametrize("case", ["llama3", "yarn-mscale"])
def test_model_with_scaled_rope_matches_transformers(case, tmp_path):
    path = save_tiny_model(tmp_path, "llama", rope_parameters=dict(ROPE_CASES[case]), head_dim=HEAD_DIM)
    sequences = [list(range(3, 40)), list(range(100, 110))]
    for got, want in zip(
        forward_no_cache(load_engine_model(path), sequences), reference_logits(path, sequences), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
