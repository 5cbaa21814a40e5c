"""Mixture-of-experts MLP: every token goes through its top-k experts' SiLU-gated MLPs, weighted by its router.

    out[t] = sum_j weight[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = expert[t, j]

Weights are stacked per expert: w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I]. The Triton version sorts
the (token, slot) pairs by expert, pads each expert's run to a whole tile of rows, and runs one grouped GEMM per
projection: a program takes a tile of rows that all belong to one expert and multiplies them by that expert's weight.
The first GEMM applies SiLU-and-mul to its gate and up tiles before storing; the second multiplies each row by its
routing weight. The sort runs on the device with no host synchronisation, so a decode step stays capturable in a CUDA
graph.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def fused_moe_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k] (x's dtype), topk_ids [T, k] int -> [T, H].
    One expert at a time over the tokens routed to it, in x's dtype, as transformers does."""
    out = torch.zeros_like(x)
    for expert in topk_ids.unique().tolist():
        tokens, slots = torch.where(topk_ids == expert)
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert]) * topk_weights[tokens, slots, None]
        out.index_add_(0, tokens, y)
    return out


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs, flat index token * k + slot, grouped by expert, each expert's run padded to a multiple
    of block_m with the index T * k (no pair). Returns (sorted pair ids [P], expert of each block of block_m [P /
    block_m], num_experts for blocks past the end). P is the worst case, T * k + E * (block_m - 1) rounded up to
    block_m, so the shapes do not depend on the routing (no host synchronisation)."""
    flat = topk_ids.flatten().long()
    pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded_ends = torch.cumsum((counts + block_m - 1) // block_m * block_m, 0)
    order = torch.argsort(flat, stable=True)
    by_expert = flat[order]
    rank = torch.arange(pairs, device=flat.device) - (torch.cumsum(counts, 0) - counts)[by_expert]
    padded_starts = padded_ends - (counts + block_m - 1) // block_m * block_m
    capacity = triton.cdiv(pairs + num_experts * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((capacity,), pairs, dtype=torch.int32, device=flat.device)
    sorted_ids[padded_starts[by_expert] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_experts = torch.searchsorted(padded_ends, block_starts, right=True).to(torch.int32)
    return sorted_ids, block_experts


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, out_ptr, weights_ptr, sorted_ids_ptr, block_experts_ptr,
    num_pairs, num_experts, stride_a, stride_be, stride_bn, stride_o,
    N: tl.constexpr, K: tl.constexpr, A_ROWS_PER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATED: tl.constexpr, WEIGHTED: tl.constexpr,
):
    """Program (m, n): rows m * BLOCK_M.. of the sorted pairs, all of one expert, times columns n * BLOCK_N.. of that
    expert's weight [N (x2 when GATED), K]. Row p of the output is pair p's; its input row is a's row p // A_ROWS_PER
    (the token, for the first GEMM; the pair itself for the second)."""
    expert = tl.load(block_experts_ptr + tl.program_id(0))
    if expert >= num_experts:  # padding past the last expert's run
        return
    pair = tl.load(sorted_ids_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = pair < num_pairs
    a_rows = a_ptr + (pair // A_ROWS_PER).to(tl.int64)[:, None] * stride_a
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    b_cols = b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(a_rows + ks[None, :], mask=row_mask[:, None] & (ks[None, :] < K), other=0.0)
        b_mask = n_mask[None, :] & (ks[:, None] < K)
        acc += tl.dot(a, tl.load(b_cols + ks[:, None], mask=b_mask, other=0.0))
        if GATED:  # the up rows sit N rows below the gate rows
            acc_up += tl.dot(a, tl.load(b_cols + N * stride_bn + ks[:, None], mask=b_mask, other=0.0))
    dtype = out_ptr.dtype.element_ty
    if GATED:  # rounded where the reference rounds: each projection, then silu, then the product
        gate = acc.to(dtype).to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        acc = silu * acc_up.to(dtype).to(tl.float32)
    if WEIGHTED:
        acc = acc.to(dtype).to(tl.float32) * tl.load(weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out_rows = out_ptr + pair.to(tl.int64)[:, None] * stride_o
    tl.store(out_rows + offs_n[None, :], acc.to(dtype), mask=row_mask[:, None] & n_mask[None, :])


def _grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, sorted_ids: torch.Tensor,
    block_experts: torch.Tensor, a_rows_per: int, gated: bool, block_m: int,
) -> None:
    n = b.shape[1] // 2 if gated else b.shape[1]
    k = b.shape[2]
    block_n = min(64, triton.next_power_of_2(n))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    grid = (len(block_experts), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, b, out, weights, sorted_ids, block_experts,
        out.shape[0], b.shape[0], a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        N=n, K=k, A_ROWS_PER=a_rows_per, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GATED=gated, WEIGHTED=not gated,
    )


def fused_moe_triton(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    block_m: int = 16,
) -> torch.Tensor:
    """fused_moe_ref in two grouped GEMMs (gate/up with SiLU-and-mul, then down with the routing weight) and a sum over
    each token's k rows. x and the weights must have contiguous rows."""
    tokens, top_k = topk_ids.shape
    if w13.shape[0] != w2.shape[0] or w13.shape[2] != x.shape[1] or w2.shape[1:] != (x.shape[1], w13.shape[1] // 2):
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit")
    if x.stride(-1) != 1 or w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("fused_moe_triton needs x and the expert weights with contiguous rows")
    sorted_ids, block_experts = sort_by_expert(topk_ids, w13.shape[0], block_m)
    pairs = tokens * top_k
    weights = topk_weights.reshape(pairs).to(x.dtype).contiguous()
    hidden = torch.empty((pairs, w2.shape[2]), dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, hidden, weights, sorted_ids, block_experts, top_k, True, block_m)
    out = torch.empty((pairs, x.shape[1]), dtype=x.dtype, device=x.device)
    _grouped_gemm(hidden, w2, out, weights, sorted_ids, block_experts, 1, False, block_m)
    return out.view(tokens, top_k, -1).sum(dim=1)


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    fn = fused_moe_triton if x.is_cuda else fused_moe_ref
    return fn(x, w13, w2, topk_weights, topk_ids)
