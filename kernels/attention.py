"""Attention over the paged KV cache (decode and prefill) and over plain variable-length batches.

All functions take a flat batch and return [T, H, D] in q's dtype; softmax runs in float32. GQA: query head h reads
KV head h // (H // Hkv). A key at position j is visible to a query at position i when j <= i (causal) and, with a
sliding window W, i - j < W.
"""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vdeploy_kernels.launch import pdl, wait_for_previous
from vdeploy_kernels.rotary import rotary_and_cache_ref


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """q [..., Lq, H, D], k/v [..., Lk, Hkv, D], visible [..., Lq, Lk] bool -> [..., Lq, H, D]. torch's fused SDPA
    in float32 (on the CPU several times faster than spelling the softmax out)."""
    if q.dim() == 3:  # the CPU's flash kernel takes batched inputs only; unbatched ones fall to the slower math path
        return _attend(q[None], k[None], v[None], visible[None], scale)[0]
    out = F.scaled_dot_product_attention(
        q.float().transpose(-3, -2),
        k.float().transpose(-3, -2),
        v.float().transpose(-3, -2),
        attn_mask=visible[..., None, :, :],
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(-3, -2).nan_to_num(0.0).to(q.dtype)  # a query with no visible key gets zeros


def _visibility(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, sliding_window: int | None) -> torch.Tensor:
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    visible = diff >= 0 if causal else torch.ones_like(diff, dtype=torch.bool)
    if sliding_window is not None:
        visible &= diff < sliding_window
    return visible


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache [N, bs, Hkv, D], block_table [..., M] -> [..., M * bs, Hkv, D]."""
    # index_select copies whole blocks; on CPU it is ~5x faster than the equivalent advanced indexing.
    blocks = cache.index_select(0, block_table.flatten().long())
    return blocks.view(*block_table.shape[:-1], -1, *cache.shape[2:])


def paged_decode_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query per sequence: q [B, H, D] at position seq_lens[b] - 1."""
    blocks = block_tables.long()
    k = _gather_context(key_cache, blocks)  # [B, M*bs, Hkv, D]
    v = _gather_context(value_cache, blocks)
    batch, num_heads, head_dim = q.shape
    q_pos = seq_lens - 1
    visible = _visibility(q_pos, torch.arange(k.shape[1], device=q.device), True, sliding_window)  # [B, Lk]
    # The query heads that share a KV head attend as that head's queries: SDPA reads each KV head once, not once per
    # query head. This runs every layer of every CPU decode step, so it calls SDPA directly (no _attend reshuffling).
    out = F.scaled_dot_product_attention(
        q.float().view(batch, k.shape[2], -1, head_dim),  # [B, Hkv, group, D]
        k.float().transpose(1, 2),
        v.float().transpose(1, 2),
        attn_mask=visible[:, None, None, :],
        scale=scale,
    )
    return out.reshape(batch, num_heads, head_dim).nan_to_num(0.0).to(q.dtype)  # no visible key (seq_len 0): zeros


def paged_prefill_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Several queries per sequence: q [T, H, D], sequence b's queries are q[cu_seqlens_q[b]:cu_seqlens_q[b+1]], the
    last q_len tokens of its seq_lens[b]-token context (earlier tokens are a cached prefix or earlier chunks)."""
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    for b, n in enumerate(seq_lens.tolist()):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        blocks = block_tables[b, : -(-n // key_cache.shape[1])]
        k = _gather_context(key_cache, blocks)[:n]
        v = _gather_context(value_cache, blocks)[:n]
        q_pos = torch.arange(n - (e - s), n, device=q.device)
        visible = _visibility(q_pos, torch.arange(n, device=q.device), True, sliding_window)
        out[s:e] = _attend(q[s:e], k, v, visible, scale)
    return out


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention within each sequence of a flat batch, no cache: q [T, H, D], k/v [T, Hkv, D]."""
    out = torch.empty_like(q)
    starts = cu_seqlens.tolist()
    for s, e in zip(starts[:-1], starts[1:], strict=True):
        pos = torch.arange(e - s, device=q.device)
        out[s:e] = _attend(q[s:e], k[s:e], v[s:e], _visibility(pos, pos, causal, sliding_window), scale)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Triton. Scores live in the log2 domain (q·k * scale * log2(e), then exp2), the running max starts at a finite
# -1e30 so a row that sees no key yet gets zero weights instead of NaN, and a row that never sees a key comes out 0.
# The paged cache's last dim must be contiguous; block ids are widened to int64 before they scale a stride, since a
# large cache has more elements than int32 can address.

_LOG2E = 1.4426950408889634
_NO_MAX = tl.constexpr(-1.0e30)  # a global a kernel reads must be a constexpr


@triton.jit
def _key_tile(
    k_ptr, v_ptr, table_ptr, start, hi, stride_block, stride_slot, offs_d, d_mask,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr,
):
    """Keys start..start+BLOCK_N-1: their positions [BLOCK_N], and k, v [BLOCK_N, BLOCK_D] (zero from hi on).
    Paged: key j sits in block table_ptr[j // BLOCK_SIZE] at slot j % BLOCK_SIZE; flat: at row j of k_ptr/v_ptr."""
    k_pos = start + tl.arange(0, BLOCK_N)
    in_range = k_pos < hi
    if PAGED:
        block = tl.load(table_ptr + k_pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
        rows = block * stride_block + (k_pos % BLOCK_SIZE) * stride_slot
    else:
        rows = k_pos.to(tl.int64) * stride_slot
    kv_mask = in_range[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    return k_pos, k, v


@triton.jit
def _softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, PRECISION: tl.constexpr):
    """The online-softmax update of rows q [M, D] by one tile of keys (visible [M, N] or broadcastable)."""
    s = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_keys(
    acc, m_i, l_i, q, q_pos, lo, hi,
    k_ptr, v_ptr, table_ptr, qk_scale, window,
    stride_block, stride_slot, offs_d, d_mask,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr,
    SLIDING: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online softmax of the rows of q [M, D] (at context positions q_pos [M]) over keys lo..hi-1, BLOCK_N at a time."""
    for start in range(lo, hi, BLOCK_N):
        k_pos, k, v = _key_tile(
            k_ptr, v_ptr, table_ptr, start, hi, stride_block, stride_slot, offs_d, d_mask, BLOCK_N, BLOCK_SIZE, PAGED
        )
        visible = (k_pos < hi)[None, :]
        if CAUSAL:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        if SLIDING:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _rotation(position_ptr, cos_sin_ptr, stride_cos, offs_d, HALF_ROT: tl.constexpr, IS_NEOX: tl.constexpr):
    """What rotates one head in registers, for channels offs_d at the token's position: each channel's partner, the
    sign of the partner's term, cos and sin (1 and 0 for channels past the rotated ones, their own partners). The
    same products as kernels/rotary.py, so the same roundings."""
    if IS_NEOX:  # pairs (i, i + HALF_ROT)
        low = offs_d < HALF_ROT
        partner = tl.where(low, offs_d + HALF_ROT, offs_d - HALF_ROT)
        freq = tl.where(low, offs_d, offs_d - HALF_ROT)
        sign = tl.where(low, -1.0, 1.0)
    else:  # pairs (2i, 2i + 1)
        partner = offs_d ^ 1
        freq = offs_d // 2
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    rotated = offs_d < 2 * HALF_ROT
    row = cos_sin_ptr + tl.load(position_ptr).to(tl.int64) * stride_cos
    cos = tl.load(row + freq, mask=rotated, other=1.0).to(tl.float32)
    sin = tl.load(row + HALF_ROT + freq, mask=rotated, other=0.0).to(tl.float32)
    return tl.where(rotated, partner, offs_d), sign, cos, sin


@triton.jit
def _load_rotated(row_ptr, offs_d, partner, sign, cos, sin, mask):
    """Rows at row_ptr (broadcast against channels offs_d), rotated and rounded to their dtype."""
    x = tl.load(row_ptr + offs_d, mask=mask, other=0.0)
    pair = tl.load(row_ptr + partner, mask=mask, other=0.0).to(tl.float32)
    return (x.to(tl.float32) * cos + sign * pair * sin).to(x.dtype)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    positions_ptr, cos_sin_ptr, slot_mapping_ptr, out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    qk_scale, window, num_splits,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
    stride_block, stride_slot, stride_head, stride_table, stride_cos,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, SLIDING: tl.constexpr,
    PRECISION: tl.constexpr, PDL: tl.constexpr, ROTARY: tl.constexpr, HALF_ROT: tl.constexpr, IS_NEOX: tl.constexpr,
):
    """One program per (sequence, KV head, split): the GROUP query heads that share the KV head (padded to BLOCK_G
    rows so tl.dot has M >= 16) attend over one contiguous share of the visible context. It writes the output, or
    with PARTIAL (num_splits > 1) unnormalised partials that _decode_reduce_kernel combines. num_splits is a
    run-time argument so that each batch size's choice does not compile a new kernel.

    The newest key (position seq_len - 1, this step's) is attended last, on its own. Every other key was cached by an
    earlier step, so with PARTIAL the share's first tile of them is read before waiting for the previous kernel.
    ROTARY: q and the newest k/v are this step's unrotated projections (q_ptr, k_new_ptr, v_new_ptr); the program
    rotates q and k, and the program whose share holds the newest key also stores it at its slot (none for -1).
    Otherwise q is rotated already and the newest key is in the cache."""
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    newest = seq_len - 1
    first = 0
    if SLIDING:
        first = tl.maximum(seq_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    cached_hi = tl.minimum(hi, newest)  # the share's keys from earlier steps end here

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    table = block_tables_ptr + seq * stride_table
    k_base = k_cache_ptr + kv_head * stride_head
    v_base = v_cache_ptr + kv_head * stride_head
    rest = lo
    if PARTIAL:  # a short share (small batches), whose first tile may be all of it: read it now
        k_pos, k, v = _key_tile(
            k_base, v_base, table, lo, cached_hi, stride_block, stride_slot, offs_d, d_mask, BLOCK_N, BLOCK_SIZE, True
        )
        rest += BLOCK_N
    if ROTARY:
        partner, sign, cos, sin = _rotation(positions_ptr + seq, cos_sin_ptr, stride_cos, offs_d, HALF_ROT, IS_NEOX)
        slot = tl.load(slot_mapping_ptr + seq)
    else:  # where the newest key is (the previous kernel stores it there)
        newest_block = tl.load(table + tl.maximum(newest, 0) // BLOCK_SIZE).to(tl.int64)
        newest_row = newest_block * stride_block + (tl.maximum(newest, 0) % BLOCK_SIZE) * stride_slot
    wait_for_previous(PDL)

    offs_g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + offs_g
    row_mask = (offs_g < GROUP)[:, None] & d_mask[None, :]
    q_rows = q_ptr + seq * stride_qb + heads[:, None] * stride_qh
    # The newest key and value are read with q, not after the cached keys: no read waits on arithmetic.
    owns_newest = (lo <= newest) & (newest < hi)
    newest_mask = tl.where(owns_newest, d_mask, False)
    if ROTARY:
        q = _load_rotated(q_rows, offs_d[None, :], partner[None, :], sign[None, :], cos[None, :], sin[None, :], row_mask)
        k_row = _load_rotated(
            k_new_ptr + seq * stride_kb + kv_head * stride_kh, offs_d, partner, sign, cos, sin, newest_mask
        )
        v_row = tl.load(v_new_ptr + seq * stride_vb + kv_head * stride_vh + offs_d, mask=newest_mask, other=0.0)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=row_mask, other=0.0)
        k_row = tl.load(k_base + newest_row + offs_d, mask=newest_mask, other=0.0)
        v_row = tl.load(v_base + newest_row + offs_d, mask=newest_mask, other=0.0)

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], _NO_MAX, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    # Every key in [lo, hi) is visible to the single query at seq_len - 1, so no causal or window mask is needed.
    if PARTIAL:
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, (k_pos < cached_hi)[None, :], qk_scale, PRECISION)
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q, offs_g, rest, cached_hi, k_base, v_base, table, qk_scale, window,
        stride_block, stride_slot, offs_d, d_mask, BLOCK_N, BLOCK_SIZE, True, False, False, PRECISION,
    )
    if owns_newest:
        if ROTARY:
            if slot >= 0:
                slot_row = (slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_slot
                tl.store(k_base + slot_row + offs_d, k_row, mask=d_mask)
                tl.store(v_base + slot_row + offs_d, v_row, mask=d_mask)
        # _softmax_step for one key, as vector products: the same roundings (p to v's dtype) without a padded tile.
        s = tl.sum(q.to(tl.float32) * k_row.to(tl.float32)[None, :], 1) * qk_scale
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p.to(v_row.dtype).to(tl.float32)[:, None] * v_row.to(tl.float32)[None, :]
        m_i = m_new

    if PARTIAL:
        part = (seq * GROUP * tl.num_programs(1) + heads) * num_splits + split  # [B, H, num_splits] row-major
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_mask)
        tl.store(part_max_ptr + part, m_i, mask=offs_g < GROUP)
        tl.store(part_sum_ptr + part, l_i, mask=offs_g < GROUP)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    """One program per (sequence, query head): rescale each split's partial to the global max and normalise."""
    wait_for_previous(PDL)
    seq, head = tl.program_id(0), tl.program_id(1)
    part = (seq * tl.num_programs(1) + head) * num_splits + tl.arange(0, BLOCK_S)
    s_mask = tl.arange(0, BLOCK_S) < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m = tl.load(part_max_ptr + part, mask=s_mask, other=float("-inf"))
    weight = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(weight * tl.load(part_sum_ptr + part, mask=s_mask, other=0.0), 0)
    acc_ptrs = part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :]
    acc = tl.load(acc_ptrs, mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(weight[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _find_sequence(cu_seqlens_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The sequence that owns query tile `tile`, where sequence b's tiles start at cu_seqlens[b] // BLOCK_Q + b
    (a start that leaves room for every sequence's partial last tile): a binary search for the last start <= tile."""
    lo = tile * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        owns = tl.load(cu_seqlens_ptr + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid - 1)
    return lo


# The batch's sequence count varies step to step: unspecialised, it does not compile a variant for 1, for multiples of
# 16 and for the rest (each compile takes seconds on the GPU host's CPU, paid by the first steps that meet it).
@triton.jit(do_not_specialize=["num_seqs"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, cu_seqlens_q_ptr, seq_lens_ptr, out_ptr,
    qk_scale, window, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_block, stride_slot, stride_head, stride_table,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr,
    CAUSAL: tl.constexpr, SLIDING: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (tile of BLOCK_Q query tokens of one sequence, KV head). Its BLOCK_Q * BLOCK_G rows are every
    (token, query head of the KV group) pair, so K/V are read once per group, and a sequence with one query (a
    decode mixed into a prefill batch) still fills the rows. The grid needs no host sync: it covers T // BLOCK_Q + B
    tiles, and a tile past its sequence's queries returns at once.
    PAGED: keys come from the paged cache and the queries are the last q_len of seq_lens[b] positions.
    Not PAGED: keys are k_ptr/v_ptr rows cu_seqlens_q[b]..cu_seqlens_q[b+1]-1, the same tokens as the queries."""
    tile, kv_head = tl.program_id(0), tl.program_id(1)
    seq = _find_sequence(cu_seqlens_q_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return

    if PAGED:
        seq_len = tl.load(seq_lens_ptr + seq)
        k_base = k_ptr + kv_head * stride_head
        v_base = v_ptr + kv_head * stride_head
    else:
        seq_len = q_len
        k_base = k_ptr + q_start.to(tl.int64) * stride_slot + kv_head * stride_head
        v_base = v_ptr + q_start.to(tl.int64) * stride_slot + kv_head * stride_head

    rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    token = q_tile * BLOCK_Q + rows // BLOCK_G  # index among the sequence's queries
    head = kv_head * GROUP + rows % BLOCK_G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = ((rows % BLOCK_G < GROUP) & (token < q_len))[:, None] & d_mask[None, :]
    q_rows = (q_start + token).to(tl.int64)
    q_offsets = q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_mask, other=0.0)

    first_pos = seq_len - q_len + q_tile * BLOCK_Q  # context position of the tile's first query
    lo = 0
    hi = seq_len
    if CAUSAL:
        hi = tl.minimum(first_pos + BLOCK_Q, seq_len)
    if SLIDING:
        lo = tl.maximum(first_pos - window + 1, 0)

    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_Q * BLOCK_G], _NO_MAX, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], dtype=tl.float32)
    q_pos = seq_len - q_len + token
    table = block_tables_ptr + seq * stride_table
    if CAUSAL and not SLIDING:
        # Whole key tiles at or before the tile's first query are visible to every row: no mask to compute.
        diagonal = (first_pos + 1) // BLOCK_N * BLOCK_N
        acc, m_i, l_i = _attend_keys(
            acc, m_i, l_i, q, q_pos, 0, diagonal,
            k_base, v_base, table, qk_scale, window, stride_block, stride_slot, offs_d, d_mask,
            BLOCK_N, BLOCK_SIZE, PAGED, False, False, PRECISION,
        )
        lo = diagonal
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q, q_pos, lo, hi,
        k_base, v_base, table, qk_scale, window, stride_block, stride_slot, offs_d, d_mask,
        BLOCK_N, BLOCK_SIZE, PAGED, CAUSAL, SLIDING, PRECISION,
    )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_offsets = q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_mask)


# Tile sizes. 64 keys per step keeps several 16-byte loads in flight per thread; head_dim 256 halves it so the K
# and V tiles of Triton's pipeline stages still fit in shared memory. Decode pads the query heads of a KV group to 16
# rows, the smallest tl.dot tile the GPU compiler accepts. A prefill tile has 128 rows over 8 warps (two Hopper
# warpgroups of 64-row wgmma, the usual flash-attention shape there), 64 over 4 at head_dim 256 to bound registers;
# its rows are tokens times the KV group padded to a power of two.
_DECODE_WARPS = 4
_MIN_DECODE_ROWS = 16
_MIN_SPLIT_TOKENS = 64  # one key tile: a split shorter than that only adds partials to combine
_REDUCE_ELEMENTS = 8192  # splits x head_dim a reduce program holds: 64 fp32 registers per thread at 4 warps


def _prefill_tile(head_dim: int) -> tuple[int, int]:
    """(rows per prefill tile, warps)."""
    return (128, 8) if triton.next_power_of_2(head_dim) <= 128 else (64, 4)


def _block_n(head_dim: int) -> int:
    return 64 if triton.next_power_of_2(head_dim) <= 128 else 32


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _decode_splits(batch: int, num_kv_heads: int, head_dim: int, context_capacity: int, device: torch.device) -> int:
    """Enough splits of the context for about two programs per multiprocessor (batch 1 at long context would
    otherwise leave most of the GPU idle, and short splits keep each program's chain of dependent loads short),
    none shorter than _MIN_SPLIT_TOKENS of the block table's capacity, no more than one reduce program holds.
    Shapes only, no look at seq_lens: the choice is fixed for a CUDA graph."""
    wanted = triton.cdiv(2 * _multiprocessors(device), batch * num_kv_heads)
    most = _REDUCE_ELEMENTS // triton.next_power_of_2(head_dim)
    return max(1, min(wanted, triton.cdiv(context_capacity, _MIN_SPLIT_TOKENS), most))


def _precision(dtype: torch.dtype) -> str:
    """float32 inputs get full-precision products (tl.dot would round them to tf32); halves are exact either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if key_cache.stride() != value_cache.stride() or key_cache.stride(-1) != 1:
        raise ValueError("key_cache and value_cache need the same layout with a contiguous last dim")


def _window(sliding_window: int | None) -> int:
    return 0 if sliding_window is None else sliding_window


def _launch_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    num_splits: int | None,
    new_kv: tuple | None = None,
) -> torch.Tensor:
    """Flash-decoding: each sequence's context is cut into num_splits shares (chosen from shapes when None) attended
    in parallel and combined by a second kernel. new_kv = (k, v, positions, cos_sin_cache, slot_mapping, is_neox)
    makes q and k unrotated and the newest k/v not yet cached (rotary_decode_attention)."""
    q = _unit_stride(q)
    _check_cache(key_cache, value_cache)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    block_n = _block_n(head_dim)
    if num_splits is None:
        num_splits = _decode_splits(batch, num_kv_heads, head_dim, block_tables.shape[1] * block_size, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    part_shape = (batch, num_heads, num_splits)
    part_out = torch.empty((*part_shape, head_dim), dtype=torch.float32, device=q.device) if num_splits > 1 else out
    part_max = torch.empty(part_shape, dtype=torch.float32, device=q.device) if num_splits > 1 else out
    part_sum = torch.empty(part_shape, dtype=torch.float32, device=q.device) if num_splits > 1 else out
    if new_kv is None:  # the rotary arguments are not read: any tensors stand in
        k, v, positions, cos_sin_cache, slot_mapping, is_neox = q, q, seq_lens, q, seq_lens, True
    else:
        k, v, positions, cos_sin_cache, slot_mapping, is_neox = new_kv
        k, v = _unit_stride(k), _unit_stride(v)
    block_d = triton.next_power_of_2(head_dim)
    use_pdl = pdl(q)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k, v, key_cache, value_cache, block_tables, seq_lens, positions, cos_sin_cache, slot_mapping,
        out, part_out, part_max, part_sum, scale * _LOG2E, _window(sliding_window), num_splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0), cos_sin_cache.stride(0),
        GROUP=group, BLOCK_G=max(_MIN_DECODE_ROWS, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=block_n, PARTIAL=num_splits > 1,
        SLIDING=sliding_window is not None, PRECISION=_precision(q.dtype), PDL=use_pdl,
        ROTARY=new_kv is not None, HALF_ROT=cos_sin_cache.shape[-1] // 2 if new_kv is not None else 1,
        IS_NEOX=is_neox, num_warps=_DECODE_WARPS, launch_pdl=use_pdl,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_out, part_max, part_sum, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits), PDL=use_pdl,
            num_warps=_DECODE_WARPS, launch_pdl=use_pdl,
        )
    return out


def paged_decode_attention_triton(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """paged_decode_attention in Triton (flash-decoding); num_splits forces how many shares each context is cut into."""
    return _launch_decode(q, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window, num_splits)


def rotary_decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    is_neox: bool = True,
) -> torch.Tensor:
    """A decode step's attention from its unrotated projections: q [B, H, D], k/v [B, Hkv, D] of each sequence's
    newest token (at position seq_lens[b] - 1), rotated and cached as rotary_and_cache does, then
    paged_decode_attention. A row whose slot is -1 (padding) stores nothing, and its output is unspecified."""
    q = rotary_and_cache_ref(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping, is_neox)
    return paged_decode_attention_ref(q, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window)


def rotary_decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    is_neox: bool = True,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """rotary_decode_attention without a rotary launch: the decode kernel rotates q and the newest k in registers,
    and attends to the newest k/v from there while it stores them."""
    new_kv = (k, v, positions, cos_sin_cache, slot_mapping, is_neox)
    return _launch_decode(q, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window, num_splits, new_kv)


def _launch_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    causal: bool,
    sliding_window: int | None,
    paged: bool,
) -> torch.Tensor:
    q = _unit_stride(q)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[-2]
    num_seqs = cu_seqlens_q.shape[0] - 1
    # Paged k/v are [num_blocks, block_size, Hkv, D]; flat ones [T, Hkv, D] are addressed by row (no block table).
    block_size = k.shape[1] if paged else 1
    stride_block = k.stride(0) if paged else 0
    stride_slot = k.stride(1) if paged else k.stride(0)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    rows, num_warps = _prefill_tile(head_dim)
    block_q = max(1, rows // block_g)
    _prefill_kernel[(num_tokens // block_q + num_seqs, num_kv_heads)](
        q, k, v, block_tables, cu_seqlens_q, seq_lens, out,
        scale * _LOG2E, _window(sliding_window), num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        stride_block, stride_slot, k.stride(-2), block_tables.stride(0),
        GROUP=group, BLOCK_G=block_g, BLOCK_Q=block_q, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_N=_block_n(head_dim), BLOCK_SIZE=block_size, PAGED=paged, CAUSAL=causal,
        SLIDING=sliding_window is not None, PRECISION=_precision(q.dtype), num_warps=num_warps,
    )
    return out


def paged_prefill_attention_triton(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """paged_prefill_attention in Triton: causal flash attention whose keys are read through the block tables."""
    _check_cache(key_cache, value_cache)
    return _launch_prefill(
        q, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, scale, True, sliding_window, paged=True
    )


def varlen_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """varlen_attention in Triton: the prefill kernel with keys read from the flat batch instead of the cache."""
    k, v = _unit_stride(k), _unit_stride(v)
    if k.stride() != v.stride():  # the kernel reads both through k's strides
        k, v = k.contiguous(), v.contiguous()
    # block_tables and seq_lens are not read when the keys are flat; cu_seqlens stands in for both pointers.
    return _launch_prefill(
        q, k, v, cu_seqlens[None], cu_seqlens, cu_seqlens, scale, causal, sliding_window, paged=False
    )


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    fn = paged_decode_attention_triton if q.is_cuda else paged_decode_attention_ref
    return fn(q, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window)


def rotary_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    is_neox: bool = True,
) -> torch.Tensor:
    fn = rotary_decode_attention_triton if q.is_cuda else rotary_decode_attention_ref
    args = (q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping, block_tables, seq_lens, scale)
    return fn(*args, sliding_window, is_neox)


def paged_prefill_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    fn = paged_prefill_attention_triton if q.is_cuda else paged_prefill_attention_ref
    return fn(q, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, scale, sliding_window)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
) -> torch.Tensor:
    fn = varlen_attention_triton if q.is_cuda else varlen_attention_ref
    return fn(q, k, v, cu_seqlens, scale, causal, sliding_window)
