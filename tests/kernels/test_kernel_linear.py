"""fused_linear (RMSNorm / SiLU-and-mul prologue, bias and residual epilogue) against the unfused reference.

Unmarked tests run fused_linear_triton in Triton's interpreter at small sizes with tiles forced small, so N and K end
in partial tiles and K takes several steps; fp16 and fp32 only (the interpreter's bf16 products are not the GPU's).
Tests marked `gpu` go through the public function at the projection shapes of Qwen2.5-0.5B and SmolLM2 in bf16.
"""

import pytest
import torch

from vdeploy_kernels import ops
from vdeploy_kernels.linear import MAX_ROWS, fused_linear_ref, fused_linear_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# One rounding of the output apart; products are summed in float32 in a different order than the reference's GEMM.
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def randn(*shape, dtype=torch.float16, device=DEVICE, seed=1, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(device, dtype)


def make_inputs(rows, n, k, prologue, with_bias, with_residual, dtype, device=DEVICE):
    """Inputs for one projection, scaled so outputs are about unit size: rounding then matters as much as it does
    in a model."""
    x = randn(rows, 2 * k if prologue == "gate_up" else k, dtype=dtype, device=device)
    weight = randn(n, k, dtype=dtype, device=device, seed=2, scale=k**-0.5)
    return x, weight, dict(
        bias=randn(n, dtype=dtype, device=device, seed=3) if with_bias else None,
        norm_weight=randn(k, dtype=dtype, device=device, seed=4) if prologue == "norm" else None,
        gate_up=prologue == "gate_up",
        residual=randn(rows, n, dtype=dtype, device=device, seed=5) if with_residual else None,
    )


@pytest.mark.parametrize("dtype,rows", [(torch.float16, 1), (torch.float16, 3), (torch.float16, 8), (torch.float32, 3)])
@pytest.mark.parametrize("prologue", [None, "norm", "gate_up"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_linear_matches_reference(dtype, rows, prologue, with_bias, with_residual):
    x, weight, options = make_inputs(rows, 7, 40, prologue, with_bias, with_residual, dtype)
    out = fused_linear_triton(x, weight, **options, eps=1e-5, block_n=4, block_k=16)
    ref = fused_linear_ref(x, weight, **options, eps=1e-5)
    assert out.shape == (rows, 7) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("prologue", [None, "norm", "gate_up"])
def test_fused_linear_default_tiles_and_strided_rows(prologue):
    """The tiles _linear_config picks (all of K in one step here), and x as a column slice of a wider tensor."""
    x, weight, options = make_inputs(5, 12, 300, prologue, True, True, torch.float16)
    strided = torch.cat((x, x[:, :7]), dim=1)[:, : x.shape[1]]
    out = fused_linear_triton(strided, weight, **options)
    torch.testing.assert_close(out, fused_linear_ref(x, weight, **options), **TOLERANCE[torch.float16])


def test_fused_linear_rejects_more_rows_than_it_is_built_for():
    x, weight, _ = make_inputs(MAX_ROWS + 1, 8, 16, None, False, False, torch.float16)
    with pytest.raises(ValueError, match="at most 16 rows"):
        fused_linear_triton(x, weight)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(x=randn(2, 33)), "does not fit weight"),
        (dict(gate_up=True, norm_weight=randn(32)), "not both"),
        (dict(bias=randn(7)), "bias must be"),
        (dict(residual=randn(2, 8, dtype=torch.float32)), "residual must be"),
    ],
)
def test_fused_linear_names_the_bad_argument(change, message):
    args = dict(x=randn(2, 32), weight=randn(8, 32, seed=2)) | change
    for fn in (fused_linear_ref, fused_linear_triton):
        with pytest.raises(ValueError, match=message):
            fn(**args)


# -------------------------------------------------------------- real shapes on the GPU, through the public function

# (name, N, K, prologue, bias, residual) per projection of a decoder layer.
QWEN2_5_0_5B = [  # hidden 896, intermediate 4864, 14 heads / 2 KV heads of 64
    ("qkv", 1152, 896, "norm", True, False),
    ("o", 896, 896, None, False, True),
    ("gate_up", 9728, 896, "norm", False, False),
    ("down", 896, 4864, "gate_up", False, True),
]
SMOLLM2_135M = [  # hidden 576, intermediate 1536, 9 heads / 3 KV heads of 64
    ("qkv", 960, 576, "norm", False, False),
    ("o", 576, 576, None, False, True),
    ("gate_up", 3072, 576, "norm", False, False),
    ("down", 576, 1536, "gate_up", False, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("projection", QWEN2_5_0_5B + SMOLLM2_135M, ids=lambda p: f"{p[0]}-{p[1]}x{p[2]}")
def test_gpu_fused_linear(rows, projection):
    _, n, k, prologue, with_bias, with_residual = projection
    x, weight, options = make_inputs(rows, n, k, prologue, with_bias, with_residual, torch.bfloat16, "cuda")
    out = ops.fused_linear(x, weight, **options, eps=1e-6)
    torch.testing.assert_close(out, fused_linear_ref(x, weight, **options, eps=1e-6), **TOLERANCE[torch.bfloat16])
