"""Rotary position embedding applied to flat [T, heads, D] query and key tensors.

cos_sin_cache is [max_positions, rot_dim]: cos in the first rot_dim/2 columns, sin in the rest. Scaling variants
(linear, dynamic, llama3, yarn) only change how that cache is built (engine/layers/rotary.py), not this kernel.
is_neox=True rotates the two halves of the first rot_dim channels (GPT-NeoX / HF Llama layout);
is_neox=False rotates interleaved pairs (GPT-J layout). Channels past rot_dim pass through unchanged.
"""

import torch
import triton
import triton.language as tl


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


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, token, stride_t, stride_h, stride_ot, stride_oh, cos, sin,
    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_ROT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, IS_NEOX: tl.constexpr,
):
    """Rotates all heads of one token: pairs (i, i + HALF_ROT) for neox, (2i, 2i + 1) for gpt-j, i < HALF_ROT; then
    copies the channels past the rotated ones."""
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_r = tl.arange(0, BLOCK_R)[None, :]
    if IS_NEOX:
        first, second = offs_r, offs_r + HALF_ROT
    else:
        first, second = 2 * offs_r, 2 * offs_r + 1
    mask = (offs_h < NUM_HEADS) & (offs_r < HALF_ROT)
    src = x_ptr + token * stride_t + offs_h * stride_h
    dst = out_ptr + token * stride_ot + offs_h * stride_oh
    x1 = tl.load(src + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + second, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + first, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + second, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    if 2 * HALF_ROT < HEAD_DIM:
        offs_p = 2 * HALF_ROT + tl.arange(0, BLOCK_P)[None, :]
        pass_mask = (offs_h < NUM_HEADS) & (offs_p < HEAD_DIM)
        tl.store(dst + offs_p, tl.load(src + offs_p, mask=pass_mask), mask=pass_mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_oqt, stride_oqh, stride_okt, stride_okh, stride_cache,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF_ROT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    """One program per token: the token's cos/sin row is read once and applied to all its query and key heads."""
    token = tl.program_id(0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)[None, :]
    row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * stride_cache
    cos = tl.load(row + offs_r, mask=offs_r < HALF_ROT, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF_ROT + offs_r, mask=offs_r < HALF_ROT, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, token, stride_qt, stride_qh, stride_oqt, stride_oqh, cos, sin,
                  NUM_Q_HEADS, BLOCK_QH, HEAD_DIM, HALF_ROT, BLOCK_R, BLOCK_P, IS_NEOX)
    _rotate_heads(k_ptr, k_out_ptr, token, stride_kt, stride_kh, stride_okt, stride_okh, cos, sin,
                  NUM_K_HEADS, BLOCK_KH, HEAD_DIM, HALF_ROT, BLOCK_R, BLOCK_P, IS_NEOX)


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary in Triton: one launch rotates q and k into new contiguous tensors. Last dims must be contiguous."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    half_rot = cos_sin_cache.shape[-1] // 2
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _rotary_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, BLOCK_QH=triton.next_power_of_2(num_q_heads),
        BLOCK_KH=triton.next_power_of_2(num_k_heads), HEAD_DIM=head_dim, HALF_ROT=half_rot,
        BLOCK_R=triton.next_power_of_2(half_rot), BLOCK_P=triton.next_power_of_2(max(head_dim - 2 * half_rot, 1)),
        IS_NEOX=is_neox,
    )
    return q_out, k_out


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = apply_rotary_triton if q.is_cuda else apply_rotary_ref
    return fn(q, k, positions, cos_sin_cache, is_neox)
