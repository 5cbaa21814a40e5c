"""Attention over the paged KV cache (decode and prefill) and over plain variable-length batches.

All functions take a flat batch and return [T, H, D] in q's dtype; softmax runs in float32. GQA: query head h reads
KV head h // (H // Hkv). A key at position j is visible to a query at position i when j <= i (causal) and, with a
sliding window W, i - j < W.
"""

import torch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """q [..., Lq, H, D], k/v [..., Lk, Hkv, D], visible [..., Lq, Lk] bool -> [..., Lq, H, D]."""
    h, hkv = q.shape[-2], k.shape[-2]
    qg = q.float().unflatten(-2, (hkv, h // hkv))  # [..., Lq, Hkv, G, D]
    scores = torch.einsum("...qhgd,...khd->...hgqk", qg, k.float()) * scale
    scores = scores.masked_fill(~visible[..., None, None, :, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no visible key gets zeros
    out = torch.einsum("...hgqk,...khd->...qhgd", probs, v.float())
    return out.flatten(-3, -2).to(q.dtype)


def _visibility(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, sliding_window: int | None) -> torch.Tensor:
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    visible = diff >= 0 if causal else torch.ones_like(diff, dtype=torch.bool)
    if sliding_window is not None:
        visible &= diff < sliding_window
    return visible


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache [N, bs, Hkv, D], block_table [..., M] -> [..., M * bs, Hkv, D]."""
    blocks = cache[block_table.long()]
    return blocks.flatten(-4, -3)


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
    k = _gather_context(key_cache, block_tables)  # [B, M*bs, Hkv, D]
    v = _gather_context(value_cache, block_tables)
    k_pos = torch.arange(k.shape[1], device=q.device)
    q_pos = (seq_lens.long() - 1)[:, None]  # [B, 1]
    visible = _visibility(q_pos, k_pos.expand(len(q), -1), True, sliding_window)  # [B, 1, Lk]
    return _attend(q[:, None], k, v, visible, scale)[:, 0]


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
    for s, e in zip(starts[:-1], starts[1:]):
        pos = torch.arange(e - s, device=q.device)
        out[s:e] = _attend(q[s:e], k[s:e], v[s:e], _visibility(pos, pos, causal, sliding_window), scale)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    return paged_decode_attention_ref(q, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window)


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
    return paged_prefill_attention_ref(
        q, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, scale, sliding_window
    )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
) -> torch.Tensor:
    return varlen_attention_ref(q, k, v, cu_seqlens, scale, causal, sliding_window)
