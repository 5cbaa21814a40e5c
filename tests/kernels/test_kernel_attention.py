"""Triton attention kernels against their torch references.

Unmarked tests call the *_triton functions directly at small sizes: on a CPU box they run in Triton's interpreter
(the root conftest sets TRITON_INTERPRET=1), on a GPU box they compile for real. They use fp16, since the interpreter
gets tl.dot on bf16 wrong. Tests marked `gpu` go through the public functions (which must pick Triton for CUDA
tensors) at real model shapes, in bf16 and fp16.
"""

import pytest
import torch

from vdeploy_kernels import ops
from vdeploy_kernels.attention import (
    paged_decode_attention_ref,
    paged_decode_attention_triton,
    paged_prefill_attention_ref,
    paged_prefill_attention_triton,
    rotary_decode_attention_ref,
    rotary_decode_attention_triton,
    varlen_attention_ref,
    varlen_attention_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float16: dict(atol=4e-3, rtol=1e-2), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, device=DEVICE, seed=0):
    """Random K/V caches (every slot random, so a read past seq_len shows up) and block tables that scatter each
    sequence over shuffled blocks; unused table entries point at real blocks too."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    width = max(max(blocks_per_seq), 1) + 1
    num_blocks = sum(blocks_per_seq) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(device, dtype)
    value_cache = torch.randn(shape, generator=gen).to(device, dtype)
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(seq_lens), width), generator=gen)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = ids[used : used + n]
        used += n
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return key_cache, value_cache, tables.to(device, torch.int32), lens.to(device)


def rope_cache(rot_dim, max_positions, device=DEVICE):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(device)


def check_rotary_decode(fn, seq_lens, heads, head_dim, block_size, dtype, sliding_window, is_neox, rot_dim, **kw):
    """A decode step from a fused qkv projection: fn against the reference (rotary_and_cache, then decode attention)
    on its own copy of the caches. Sequence 1 is a CUDA-graph padding row (slot -1): it stores nothing and its output
    is not compared. Returns the output and the reference."""
    num_heads, num_kv_heads = heads
    key_cache, value_cache, tables, lens = make_paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype)
    batch = len(seq_lens)
    qkv = randn(batch, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k, v = q.view(batch, num_heads, -1), k.view(batch, num_kv_heads, -1), v.view(batch, num_kv_heads, -1)
    positions = (lens - 1).long()
    slots = tables.long().gather(1, positions[:, None] // block_size)[:, 0] * block_size + positions % block_size
    slots[1] = -1
    cos_sin = rope_cache(rot_dim, max(seq_lens))
    ref_caches = key_cache.clone(), value_cache.clone()
    args = (q, k, v, positions, cos_sin)
    ref = rotary_decode_attention_ref(*args, *ref_caches, slots, tables, lens, 0.2, sliding_window, is_neox)
    out = fn(*args, key_cache, value_cache, slots, tables, lens, 0.2, sliding_window, is_neox, **kw)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(key_cache, ref_caches[0], **tolerance)  # rotated in float32 by both: one rounding
    assert torch.equal(value_cache, ref_caches[1])
    keep = [b for b in range(batch) if b != 1]
    torch.testing.assert_close(out[keep], ref[keep], **tolerance)
    return out[keep], ref[keep]


def cu_seqlens_of(q_lens, device=DEVICE):
    return torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def randn(*shape, dtype=torch.float16, device=DEVICE, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


# ---------------------------------------------------------------- small sizes: interpreter on CPU, compiled on GPU


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("sliding_window", [None, 7])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])  # MHA, and GQA with a group that is not a power of two
def test_decode_matches_reference(num_splits, sliding_window, heads):
    num_heads, num_kv_heads = heads
    # Lengths: one key only, inside one block, a block plus a bit, and longer than a split share.
    key_cache, value_cache, tables, seq_lens = make_paged_cache([1, 13, 17, 70], num_kv_heads, 32, 16, torch.float16)
    q = randn(4, num_heads, 32)
    out = paged_decode_attention_triton(
        q, key_cache, value_cache, tables, seq_lens, 0.2, sliding_window, num_splits=num_splits
    )
    ref = paged_decode_attention_ref(q, key_cache, value_cache, tables, seq_lens, 0.2, sliding_window)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float16])


def test_decode_padded_sequence_is_zero_and_strided_query_is_read_correctly():
    """A CUDA-graph padding entry (seq_len 0) must give zeros, not NaN; q as a view into a fused qkv row."""
    key_cache, value_cache, tables, seq_lens = make_paged_cache([0, 40], 2, 64, 32, torch.float16)
    qkv = randn(2, (4 + 2 * 2) * 64)
    q = qkv[:, : 4 * 64].view(2, 4, 64)
    out = paged_decode_attention_triton(q, key_cache, value_cache, tables, seq_lens, 0.125, num_splits=2)
    ref = paged_decode_attention_ref(q, key_cache, value_cache, tables, seq_lens, 0.125)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float16])


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("sliding_window", [None, 7])
@pytest.mark.parametrize("is_neox,rot_dim", [(True, 32), (False, 32), (True, 16)])  # full and partial rotation
def test_rotary_decode_matches_rotary_and_cache_then_decode(num_splits, sliding_window, is_neox, rot_dim):
    """The newest key of each sequence sits at the start of a tile (17 = 16 + 1), mid-block, or alone (length 1)."""
    check_rotary_decode(
        rotary_decode_attention_triton, [1, 5, 17, 70], (6, 2), 32, 16, torch.float16, sliding_window, is_neox,
        rot_dim, num_splits=num_splits,
    )


@pytest.mark.parametrize("sliding_window", [None, 9])
@pytest.mark.parametrize("heads", [(2, 2), (6, 2)])  # one query head per tile row, or three padded to four
def test_prefill_reads_cached_prefix_and_chunks(sliding_window, heads):
    # Sequence 0: whole prompt (no prefix). 1: 70 new tokens after a 30-token cached prefix (several query tiles).
    # 2: a 1-token chunk at the end of 21 tokens (a decode in a mixed batch). 3: no queries this step.
    seq_lens, q_lens = [19, 100, 21, 8], [19, 70, 1, 0]
    num_heads, num_kv_heads = heads
    key_cache, value_cache, tables, lens = make_paged_cache(seq_lens, num_kv_heads, 32, 16, torch.float16)
    q = randn(sum(q_lens), num_heads, 32)
    cu = cu_seqlens_of(q_lens)
    out = paged_prefill_attention_triton(q, key_cache, value_cache, tables, cu, lens, 0.2, sliding_window)
    ref = paged_prefill_attention_ref(q, key_cache, value_cache, tables, cu, lens, 0.2, sliding_window)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float16])


@pytest.mark.parametrize("causal,sliding_window", [(True, None), (False, None), (True, 5)])
def test_varlen_matches_reference(causal, sliding_window):
    q_lens = [5, 67, 1]
    cu = cu_seqlens_of(q_lens)
    qkv = randn(sum(q_lens), (4 + 2 * 2) * 32)
    q, k, v = qkv.split([4 * 32, 2 * 32, 2 * 32], dim=-1)  # strided views, as the attention layer passes them
    q, k, v = q.view(-1, 4, 32), k.view(-1, 2, 32), v.view(-1, 2, 32)
    out = varlen_attention_triton(q, k, v, cu, 0.2, causal, sliding_window)
    ref = varlen_attention_ref(q, k, v, cu, 0.2, causal, sliding_window)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float16])


# ---------------------------------------------------------------- real sizes on the GPU, through the public functions

# (query heads, KV heads, head_dim): Qwen2.5-0.5B, SmolLM2-135M, Llama-3-8B, Gemma-like 256.
MODEL_HEADS = [(14, 2, 64), (9, 3, 64), (32, 8, 128), (8, 4, 256)]
DTYPES = [torch.bfloat16, torch.float16]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", MODEL_HEADS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("seq_lens,sliding_window", [([8191], None), ([1, 300, 2048, 17, 1000], None), ([5000], 1024)])
def test_gpu_decode(dtype, heads, block_size, seq_lens, sliding_window):
    num_heads, num_kv_heads, head_dim = heads
    key_cache, value_cache, tables, lens = make_paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype)
    q = randn(len(seq_lens), num_heads, head_dim, dtype=dtype)
    out = ops.paged_decode_attention(q, key_cache, value_cache, tables, lens, head_dim**-0.5, sliding_window)
    ref = paged_decode_attention_ref(q, key_cache, value_cache, tables, lens, head_dim**-0.5, sliding_window)
    assert not out.isnan().any()
    assert relative_error(out, ref) < 1e-2
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", MODEL_HEADS)
@pytest.mark.parametrize("seq_lens,sliding_window", [([8191, 1], None), ([1, 1, 300, 2048, 17, 1000], None), ([5000, 1], 1024)])
def test_gpu_rotary_decode(dtype, heads, seq_lens, sliding_window):
    num_heads, num_kv_heads, head_dim = heads
    for is_neox in (True, False):
        out, ref = check_rotary_decode(
            ops.rotary_decode_attention, seq_lens, (num_heads, num_kv_heads), head_dim, 16, dtype, sliding_window,
            is_neox, head_dim,
        )
        assert relative_error(out, ref) < 1e-2


@pytest.mark.gpu
def test_gpu_decode_replays_in_cuda_graph_with_new_lengths():
    """The engine captures decode once per batch size and replays it as contexts grow."""
    key_cache, value_cache, tables, lens = make_paged_cache([3000, 100, 1], 2, 64, 16, torch.bfloat16)
    q = randn(3, 14, 64, dtype=torch.bfloat16)
    ops.paged_decode_attention(q, key_cache, value_cache, tables, lens, 0.125)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.paged_decode_attention(q, key_cache, value_cache, tables, lens, 0.125)
    lens.copy_(torch.tensor([3001, 2500, 40], dtype=torch.int32))
    q.copy_(randn(3, 14, 64, dtype=torch.bfloat16, seed=5))
    graph.replay()
    ref = paged_decode_attention_ref(q, key_cache, value_cache, tables, lens, 0.125)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", MODEL_HEADS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("sliding_window", [None, 256])
def test_gpu_prefill_with_prefix(dtype, heads, block_size, sliding_window):
    num_heads, num_kv_heads, head_dim = heads
    seq_lens, q_lens = [700, 1500, 64, 2], [700, 512, 63, 1]  # full prompt, chunk after a prefix, prefix hit, decode
    key_cache, value_cache, tables, lens = make_paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype)
    q = randn(sum(q_lens), num_heads, head_dim, dtype=dtype)
    cu = cu_seqlens_of(q_lens)
    scale = head_dim**-0.5
    out = ops.paged_prefill_attention(q, key_cache, value_cache, tables, cu, lens, scale, sliding_window)
    ref = paged_prefill_attention_ref(q, key_cache, value_cache, tables, cu, lens, scale, sliding_window)
    assert relative_error(out, ref) < 1e-2
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", MODEL_HEADS)
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_varlen(dtype, heads, causal):
    num_heads, num_kv_heads, head_dim = heads
    q_lens = [1000, 1, 333, 128]
    cu = cu_seqlens_of(q_lens)
    q = randn(sum(q_lens), num_heads, head_dim, dtype=dtype)
    k = randn(sum(q_lens), num_kv_heads, head_dim, dtype=dtype, seed=2)
    v = randn(sum(q_lens), num_kv_heads, head_dim, dtype=dtype, seed=3)
    out = ops.varlen_attention(q, k, v, cu, head_dim**-0.5, causal)
    ref = varlen_attention_ref(q, k, v, cu, head_dim**-0.5, causal)
    assert relative_error(out, ref) < 1e-2
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@pytest.mark.gpu
def test_gpu_float32_attention_is_not_rounded_to_tf32():
    """A float32 model (tiny test models, some CPU-to-GPU comparisons) must get float32 products, not tf32."""
    exact = dict(atol=1e-5, rtol=1e-4)
    key_cache, value_cache, tables, lens = make_paged_cache([700, 33], 2, 64, 16, torch.float32)
    q = randn(2, 14, 64, dtype=torch.float32)
    out = ops.paged_decode_attention(q, key_cache, value_cache, tables, lens, 0.125)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, key_cache, value_cache, tables, lens, 0.125), **exact)
    q = randn(40, 14, 64, dtype=torch.float32)
    cu = cu_seqlens_of([20, 20])
    out = ops.paged_prefill_attention(q, key_cache, value_cache, tables, cu, lens, 0.125)
    ref = paged_prefill_attention_ref(q, key_cache, value_cache, tables, cu, lens, 0.125)
    torch.testing.assert_close(out, ref, **exact)
    k, v = randn(40, 2, 64, dtype=torch.float32, seed=2), randn(40, 2, 64, dtype=torch.float32, seed=3)
    out = ops.varlen_attention(q, k, v, cu, 0.125)
    torch.testing.assert_close(out, varlen_attention_ref(q, k, v, cu, 0.125), **exact)
