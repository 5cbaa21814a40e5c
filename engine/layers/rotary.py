"""Rotary position embedding: builds the cos/sin cache for a model's `rope_parameters` (default, linear, dynamic NTK,
llama3, yarn) and applies it with ops.apply_rotary. Scaling only changes the cache, never the kernel."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vdeploy_kernels import ops


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The model's RoPE settings as one dict with `rope_type` and `rope_theta`, from transformers 5's
    `rope_parameters` or 4.x's `rope_scaling` + `rope_theta`. A config built from a GGUF file may also carry
    `rope_freq_factors`: llama.cpp's explicit per-frequency divisors (how its files store llama 3.x scaling)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if getattr(hf_config, "rope_freq_factors", None) is not None:
        params["freq_factors"] = hf_config.rope_freq_factors
    return params


def _inverse_frequencies(dim: int, base: float) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def _llama3(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def _yarn(dim: int, base: float, params: dict[str, Any], original: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones with a linear ramp between the dimensions that turn
    `beta_fast` and `beta_slow` times over the original context; scale cos/sin by the attention factor."""
    factor = params["factor"]
    extrapolated = _inverse_frequencies(dim, base)
    interpolated = extrapolated / factor

    def dim_for_rotations(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(params.get("beta_fast") or 32), dim_for_rotations(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = interpolated * ramp + extrapolated * (1 - ramp)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return inv_freq, attention_factor


def build_cos_sin_cache(rot_dim: int, max_position_embeddings: int, params: dict[str, Any]) -> torch.Tensor:
    """[positions, rot_dim] float32: cos in the first rot_dim/2 columns, sin in the rest."""
    rope_type, base = params["rope_type"], params["rope_theta"]
    factor = params.get("factor", 1.0)
    original = params.get("original_max_position_embeddings") or max_position_embeddings
    length = max(max_position_embeddings, int(original * factor))  # scaling exists to reach past the original length
    attention_factor = 1.0
    if rope_type == "default":
        inv_freq = _inverse_frequencies(rot_dim, base)
    elif rope_type == "linear":
        inv_freq = _inverse_frequencies(rot_dim, base) / factor
    elif rope_type == "dynamic":
        # NTK-aware base for the longest context the cache covers (transformers grows it with the sequence instead;
        # both agree at that length).
        ntk_base = base * (factor * length / max_position_embeddings - (factor - 1)) ** (rot_dim / (rot_dim - 2))
        inv_freq = _inverse_frequencies(rot_dim, ntk_base)
    elif rope_type == "llama3":
        inv_freq = _llama3(_inverse_frequencies(rot_dim, base), params)
    elif rope_type == "yarn":
        inv_freq, attention_factor = _yarn(rot_dim, base, params, original)
    else:
        raise ValueError(f"unsupported rope type {rope_type!r} (supported: default, linear, dynamic, llama3, yarn)")
    if "freq_factors" in params:
        factors = torch.tensor(params["freq_factors"], dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"rope freq_factors has {len(factors)} entries, expected {len(inv_freq)}")
        inv_freq = inv_freq / factors
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor


class RotaryEmbedding(nn.Module):
    """One per model, shared by its attention layers."""

    def __init__(self, head_dim: int, max_position_embeddings: int, params: dict[str, Any], is_neox: bool = True):
        super().__init__()
        rot_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.is_neox = is_neox
        self.register_buffer("cos_sin_cache", build_cos_sin_cache(rot_dim, max_position_embeddings, params), False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, Hkv, D] -> rotated copies."""
        return ops.apply_rotary(q, k, positions, self.cos_sin_cache, self.is_neox)
