"""The fused MoE kernel (tokens sorted by expert, one grouped GEMM per projection) against its torch reference, in
Triton's interpreter on a CPU box (fp16/fp32: the interpreter's tl.dot is wrong on bf16), compiled on a GPU box."""

import pytest
import torch

from vdeploy_kernels.moe import fused_moe_ref, fused_moe_triton, sort_by_expert

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _routing(tokens, experts, top_k, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=generator)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


def test_sort_by_expert_groups_pairs_into_whole_blocks():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 3]])
    sorted_ids, block_experts = sort_by_expert(ids, num_experts=5, block_m=4)
    pad = ids.numel()
    blocks = sorted_ids.view(-1, 4).tolist()
    # expert 0: pairs 1 and 4; expert 1: pair 3; expert 2: pairs 0, 2, 5, 6 (one full block); expert 3: pair 7.
    assert blocks[:4] == [[1, 4, pad, pad], [3, pad, pad, pad], [0, 2, 5, 6], [7, pad, pad, pad]]
    assert block_experts[:4].tolist() == [0, 1, 2, 3]
    assert all(e == 5 for e in block_experts[4:].tolist())  # blocks past the end: no expert
    assert all(p == pad for block in blocks[4:] for p in block)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
@pytest.mark.parametrize("tokens, experts, top_k", [(1, 8, 2), (37, 8, 2), (20, 16, 4)])
def test_fused_moe_matches_reference(tokens, experts, top_k, dtype, atol):
    hidden, inter = 64, 48  # an intermediate size that is not a power of two: masked columns
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=generator).to(DEVICE, dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=generator) * 0.2).to(DEVICE, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=generator) * 0.2).to(DEVICE, dtype)
    weights, ids = _routing(tokens, experts, top_k, seed=1)
    weights, ids = weights.to(DEVICE, dtype), ids.to(DEVICE)
    want = fused_moe_ref(x.float(), w13.float(), w2.float(), weights.float(), ids)
    got = fused_moe_triton(x, w13, w2, weights, ids)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=atol)


def test_reference_weights_each_expert_by_its_router_weight():
    """One token, two experts with identity-like weights: the output is the weighted sum of the two experts."""
    hidden = inter = 4
    x = torch.ones(1, hidden)
    w13 = torch.zeros(3, 2 * inter, hidden)
    w2 = torch.stack([torch.eye(hidden) * (e + 1) for e in range(3)])
    w13[:, :inter] = torch.eye(hidden) * 20  # silu(20) ~ 20
    w13[:, inter:] = torch.eye(hidden)
    out = fused_moe_ref(x, w13, w2, torch.tensor([[0.75, 0.25]]), torch.tensor([[2, 0]]))
    torch.testing.assert_close(out, torch.full((1, hidden), 20.0 * (0.75 * 3 + 0.25 * 1)), atol=1e-4, rtol=0)
