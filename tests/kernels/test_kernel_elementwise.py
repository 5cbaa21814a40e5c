"""Triton KV-cache write, RMSNorm, rotary (alone and fused with the KV-cache write) and SiLU-and-mul against their
torch references.

Unmarked tests call the *_triton functions at small sizes (Triton's interpreter on a CPU box, compiled on a GPU box),
bf16 included since these kernels use no tl.dot; tests marked `gpu` go through the public functions at real sizes.
"""

import pytest
import torch

from vdeploy_kernels import ops
from vdeploy_kernels.activation import silu_and_mul_ref, silu_and_mul_triton
from vdeploy_kernels.kv_cache import write_kv_cache_ref, write_kv_cache_triton
from vdeploy_kernels.rms_norm import rms_norm_ref, rms_norm_triton
from vdeploy_kernels.rotary import apply_rotary_ref, apply_rotary_triton, rotary_and_cache_ref, rotary_and_cache_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# One rounding of the output dtype apart (the kernels round where the references round, in float32 in between).
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
ELEMENTWISE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(*shape, dtype=torch.float16, device=DEVICE, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def check_kv_write(write, num_tokens, num_kv_heads, head_dim, block_size, num_blocks, dtype, device):
    """Fused-qkv views as keys/values, a shuffled slot mapping with skipped (-1) tokens, and a cache full of random
    values: written slots must hold the tokens exactly, and every other slot must stay as it was."""
    qkv = randn(num_tokens, 3 * num_kv_heads * head_dim, dtype=dtype, device=device)
    _, key, value = qkv.view(num_tokens, 3, num_kv_heads, head_dim).unbind(1)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(3))[:num_tokens]
    slots[::3] = -1
    slot_mapping = slots.to(device)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = randn(*cache_shape, dtype=dtype, device=device, seed=4)
    value_cache = randn(*cache_shape, dtype=dtype, device=device, seed=5)
    expected_key, expected_value = key_cache.clone(), value_cache.clone()
    write_kv_cache_ref(key, value, expected_key, expected_value, slot_mapping)
    write(key, value, key_cache, value_cache, slot_mapping)
    assert torch.equal(key_cache, expected_key)
    assert torch.equal(value_cache, expected_value)


def test_write_kv_cache_matches_reference():
    check_kv_write(write_kv_cache_triton, 20, 3, 24, 16, 4, torch.float16, DEVICE)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, with_residual):
    x = randn(5, 96, dtype=dtype)  # a hidden size that is not a power of two
    weight = randn(96, dtype=dtype, seed=2)
    residual = randn(5, 96, dtype=dtype, seed=3) if with_residual else None
    out = rms_norm_triton(x, weight, 1e-6, residual)
    ref = rms_norm_ref(x, weight, 1e-6, residual)
    if with_residual:
        torch.testing.assert_close(out[1], ref[1], **TOLERANCE[dtype])
        out, ref = out[0], ref[0]
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [32, 16])  # full and partial rotation
def test_rotary_matches_reference(dtype, is_neox, rot_dim):
    num_tokens, head_dim = 6, 32
    qkv = randn(num_tokens, (3 + 2 * 2) * head_dim, dtype=dtype)
    q, k, _ = qkv.split([3 * head_dim, 2 * head_dim, 2 * head_dim], dim=-1)  # strided views of a fused projection
    q, k = q.view(num_tokens, 3, head_dim), k.view(num_tokens, 2, head_dim)
    cos_sin_cache = randn(50, rot_dim, dtype=torch.float32, seed=7)
    positions = torch.tensor([0, 5, 49, 3, 3, 17], device=DEVICE)
    out_q, out_k = apply_rotary_triton(q, k, positions, cos_sin_cache, is_neox)
    ref_q, ref_k = apply_rotary_ref(q, k, positions, cos_sin_cache, is_neox)
    torch.testing.assert_close(out_q, ref_q, **TOLERANCE[dtype])
    torch.testing.assert_close(out_k, ref_k, **TOLERANCE[dtype])


def rope_cache(rot_dim, max_positions, device):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def check_rotary_and_cache(fn, num_tokens, heads, head_dim, rot_dim, is_neox, dtype, device, block_size=16):
    """q/k/v as views of one fused qkv projection, a shuffled slot mapping with skipped (-1) tokens, and caches full
    of random values: q and the key cache match the reference to one rounding, the value cache exactly, and every
    slot not written keeps its old value."""
    num_heads, num_kv_heads = heads
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k, v = (x.view(num_tokens, num_kv_heads, head_dim) for x in (k, v))
    num_blocks = 2 * num_tokens // block_size + 1
    positions = torch.randint(0, 4096, (num_tokens,), generator=torch.Generator().manual_seed(2)).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(3))[:num_tokens]
    slots[1::3] = -1  # token 0 is always stored, even in a batch of one
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = randn(*cache_shape, dtype=dtype, device=device, seed=4)
    value_cache = randn(*cache_shape, dtype=dtype, device=device, seed=5)
    expected_key, expected_value = key_cache.clone(), value_cache.clone()
    cos_sin_cache = rope_cache(rot_dim, 4096, device)
    args = (positions, cos_sin_cache)
    ref_q = rotary_and_cache_ref(q, k, v, *args, expected_key, expected_value, slots.to(device), is_neox)
    out_q = fn(q, k, v, *args, key_cache, value_cache, slots.to(device), is_neox)
    torch.testing.assert_close(out_q, ref_q, **TOLERANCE[dtype])
    torch.testing.assert_close(key_cache, expected_key, **TOLERANCE[dtype])
    assert torch.equal(value_cache, expected_value)
    assert not torch.equal(key_cache, randn(*cache_shape, dtype=dtype, device=device, seed=4))  # keys were written


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [32, 16])  # full and partial rotation
def test_rotary_and_cache_matches_reference(dtype, is_neox, rot_dim):
    check_rotary_and_cache(rotary_and_cache_triton, 7, (3, 2), 32, rot_dim, is_neox, dtype, DEVICE, block_size=4)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
def test_silu_and_mul_matches_reference(dtype):
    x = randn(2, 3, 2 * 40, dtype=dtype) * 3
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_ref(x), **TOLERANCE[dtype])


def test_rms_norm_promotes_like_reference():
    """A float32 residual stream under fp16 activations: the sum, the norm and the output are float32, as in torch."""
    x, residual, weight = randn(3, 64), randn(3, 64, dtype=torch.float32, seed=2), randn(64, seed=3)
    out, new_residual = rms_norm_triton(x, weight, 1e-6, residual)
    ref, ref_residual = rms_norm_ref(x, weight, 1e-6, residual)
    assert out.dtype == ref.dtype == new_residual.dtype == torch.float32
    torch.testing.assert_close(new_residual, ref_residual, **TOLERANCE[torch.float32])
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float16])


# ---------------------------------------------------------------- real sizes on the GPU, through the public functions


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (8, 128), (1, 256)])
def test_gpu_write_kv_cache(dtype, block_size, num_kv_heads, head_dim):
    check_kv_write(ops.write_kv_cache, 4096, num_kv_heads, head_dim, block_size, 1024, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("hidden", [576, 896, 4096, 8192])
def test_gpu_rms_norm(dtype, hidden):
    x, residual = randn(333, hidden, dtype=dtype), randn(333, hidden, dtype=dtype, seed=2)
    weight = randn(hidden, dtype=dtype, seed=3)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), **TOLERANCE[dtype])
    out, new_residual = ops.rms_norm(x, weight, 1e-5, residual)
    ref, ref_residual = rms_norm_ref(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])
    torch.testing.assert_close(new_residual, ref_residual, **TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("heads,head_dim,rot_dim", [((14, 2), 64, 64), ((32, 8), 128, 128), ((32, 32), 128, 32)])
def test_gpu_rotary(dtype, is_neox, heads, head_dim, rot_dim):
    num_tokens = 2048
    q = randn(num_tokens, heads[0], head_dim, dtype=dtype)
    k = randn(num_tokens, heads[1], head_dim, dtype=dtype, seed=2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device="cuda") / rot_dim))
    angles = torch.outer(torch.arange(8192, dtype=torch.float32, device="cuda"), inv_freq)
    cos_sin_cache = torch.cat((angles.cos(), angles.sin()), dim=-1)
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda")
    out_q, out_k = ops.apply_rotary(q, k, positions, cos_sin_cache, is_neox)
    ref_q, ref_k = apply_rotary_ref(q, k, positions, cos_sin_cache, is_neox)
    torch.testing.assert_close(out_q, ref_q, **TOLERANCE[dtype])
    torch.testing.assert_close(out_k, ref_k, **TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("heads,head_dim,rot_dim", [((14, 2), 64, 64), ((9, 3), 64, 64), ((32, 8), 128, 32)])
@pytest.mark.parametrize("num_tokens", [1, 8, 2048])  # decode batches and a prefill
def test_gpu_rotary_and_cache(dtype, is_neox, heads, head_dim, rot_dim, num_tokens):
    check_rotary_and_cache(ops.rotary_and_cache, num_tokens, heads, head_dim, rot_dim, is_neox, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("intermediate", [1536, 4864, 14336])
def test_gpu_silu_and_mul(dtype, intermediate):
    x = randn(257, 2 * intermediate, dtype=dtype) * 3
    torch.testing.assert_close(ops.silu_and_mul(x), silu_and_mul_ref(x), **TOLERANCE[dtype])
