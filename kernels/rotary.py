"""Rotary position embedding applied to flat [T, heads, D] query and key tensors.

cos_sin_cache is [max_positions, rot_dim]: cos in the first rot_dim/2 columns, sin in the rest. Scaling variants
(linear, dynamic, llama3, yarn) only change how that cache is built (engine/layers/rotary.py), not this kernel.
is_neox=True rotates the two halves of the first rot_dim channels (GPT-NeoX / HF Llama layout);
is_neox=False rotates interleaved pairs (GPT-J layout). Channels past rot_dim pass through unchanged.
"""

import torch


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    rot_dim = cos.shape[-1] * 2
    rot, rest = x[..., :rot_dim].float(), x[..., rot_dim:]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, Hkv, D], positions [T] -> rotated (q, k) as new tensors."""
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)
    return _rotate_ref(q, cos, sin, is_neox), _rotate_ref(k, cos, sin, is_neox)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rotary_ref(q, k, positions, cos_sin_cache, is_neox)
