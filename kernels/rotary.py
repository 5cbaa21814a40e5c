"""Rotary position embedding applied to flat [T, heads, D] query and key tensors.

cos_sin_cache is [max_positions, rot_dim]: cos in the first rot_dim/2 columns, sin in the rest. Scaling variants
(linear, dynamic, llama3, yarn) only change how that cache is built (engine/layers/rotary.py), not this kernel.
is_neox=True rotates the two halves of the first rot_dim channels (GPT-NeoX / HF Llama layout);
is_neox=False rotates interleaved pairs (GPT-J layout). Channels past rot_dim pass through unchanged.

apply_rotary returns rotated q and k; rotary_and_cache returns the rotated q and writes the rotated k, with v, straight
into the paged KV cache (what a decoder layer needs), saving a launch and a round trip of k through memory.
"""

import torch
import triton
import triton.language as tl

from vdeploy_kernels.kv_cache import write_kv_cache_ref
from vdeploy_kernels.launch import pdl, wait_for_previous


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
def _cos_sin(positions_ptr, cos_sin_ptr, token, stride_cache, HALF_ROT: tl.constexpr, BLOCK_R: tl.constexpr):
    """The token's cos and sin rows, [1, BLOCK_R] float32 each (zero past HALF_ROT)."""
    offs_r = tl.arange(0, BLOCK_R)[None, :]
    row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * stride_cache
    cos = tl.load(row + offs_r, mask=offs_r < HALF_ROT, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF_ROT + offs_r, mask=offs_r < HALF_ROT, other=0.0).to(tl.float32)
    return cos, sin


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
    cos, sin = _cos_sin(positions_ptr, cos_sin_ptr, token, stride_cache, HALF_ROT, BLOCK_R)
    _rotate_heads(q_ptr, q_out_ptr, token, stride_qt, stride_qh, stride_oqt, stride_oqh, cos, sin,
                  NUM_Q_HEADS, BLOCK_QH, HEAD_DIM, HALF_ROT, BLOCK_R, BLOCK_P, IS_NEOX)
    _rotate_heads(k_ptr, k_out_ptr, token, stride_kt, stride_kh, stride_okt, stride_okh, cos, sin,
                  NUM_K_HEADS, BLOCK_KH, HEAD_DIM, HALF_ROT, BLOCK_R, BLOCK_P, IS_NEOX)


@triton.jit
def _rotary_cache_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, key_cache_ptr, value_cache_ptr, positions_ptr, cos_sin_ptr, slot_mapping_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_oqt, stride_oqh, stride_cache,
    stride_block, stride_slot, stride_head,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HALF_ROT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr,
):
    """One program per token: rotates its query heads into q_out, and unless its slot is -1, its key heads straight
    into the key cache and its value heads unchanged into the value cache."""
    token = tl.program_id(0).to(tl.int64)
    # Positions and slots are step inputs, written before any kernel of the step: read them (and the cos/sin rows
    # they pick) before waiting for the kernel that writes q/k/v.
    cos, sin = _cos_sin(positions_ptr, cos_sin_ptr, token, stride_cache, HALF_ROT, BLOCK_R)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    wait_for_previous(PDL)
    _rotate_heads(q_ptr, q_out_ptr, token, stride_qt, stride_qh, stride_oqt, stride_oqh, cos, sin,
                  NUM_Q_HEADS, BLOCK_QH, HEAD_DIM, HALF_ROT, BLOCK_R, BLOCK_P, IS_NEOX)
    if slot < 0:
        return
    slot_offset = (slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_slot
    # The slot is this token's only row in the cache, hence a token stride of 0 on the output side.
    _rotate_heads(k_ptr, key_cache_ptr + slot_offset, token, stride_kt, stride_kh, 0, stride_head, cos, sin,
                  NUM_K_HEADS, BLOCK_KH, HEAD_DIM, HALF_ROT, BLOCK_R, BLOCK_P, IS_NEOX)
    offs_h = tl.arange(0, BLOCK_KH)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < NUM_K_HEADS) & (offs_d < HEAD_DIM)
    value = tl.load(v_ptr + token * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    tl.store(value_cache_ptr + slot_offset + offs_h * stride_head + offs_d, value, mask=mask)


def _rotary_constexprs(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> dict[str, int]:
    """Head counts, head_dim and the power-of-two blocks that cover them, shared by both launches."""
    num_q_heads, head_dim = q.shape[1:]
    num_k_heads, half_rot = k.shape[1], cos_sin_cache.shape[-1] // 2
    return dict(
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, BLOCK_QH=triton.next_power_of_2(num_q_heads),
        BLOCK_KH=triton.next_power_of_2(num_k_heads), HEAD_DIM=head_dim, HALF_ROT=half_rot,
        BLOCK_R=triton.next_power_of_2(half_rot), BLOCK_P=triton.next_power_of_2(max(head_dim - 2 * half_rot, 1)),
    )


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary in Triton: one launch rotates q and k into new contiguous tensors. Last dims must be contiguous."""
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _rotary_kernel[(q.shape[0],)](
        q, k, q_out, k_out, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
        **_rotary_constexprs(q, k, cos_sin_cache), IS_NEOX=is_neox,
    )
    return q_out, k_out


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = apply_rotary_triton if q.is_cuda else apply_rotary_ref
    return fn(q, k, positions, cos_sin_cache, is_neox)


def rotary_and_cache_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    is_neox: bool = True,
) -> torch.Tensor:
    """Rotates q [T, H, D] and k [T, Hkv, D]; writes the rotated k and v [T, Hkv, D] into the caches
    [num_blocks, block_size, Hkv, D] at slot_mapping [T] (-1 skips); returns the rotated q."""
    q, k = apply_rotary_ref(q, k, positions, cos_sin_cache, is_neox)
    write_kv_cache_ref(k, v, key_cache, value_cache, slot_mapping)
    return q


def rotary_and_cache_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    is_neox: bool = True,
) -> torch.Tensor:
    """rotary_and_cache in one launch: the rotated keys never exist outside the cache. Last dims must be
    contiguous, and both caches must share one layout."""
    if key_cache.stride() != value_cache.stride():
        raise ValueError("key_cache and value_cache need the same layout")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    use_pdl = pdl(q)
    _rotary_cache_kernel[(q.shape[0],)](
        q, k, v, q_out, key_cache, value_cache, positions, cos_sin_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), cos_sin_cache.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        **_rotary_constexprs(q, k, cos_sin_cache), BLOCK_D=triton.next_power_of_2(q.shape[2]), IS_NEOX=is_neox,
        BLOCK_SIZE=key_cache.shape[1], PDL=use_pdl, launch_pdl=use_pdl,
    )
    return q_out


def rotary_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    is_neox: bool = True,
) -> torch.Tensor:
    fn = rotary_and_cache_triton if q.is_cuda else rotary_and_cache_ref
    return fn(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping, is_neox)
