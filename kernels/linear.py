"""Linear layers for small batches (decode), fused with what surrounds them in a pre-norm decoder layer:

    out = x' W^T + bias + residual,   x' = x, or RMSNorm(x) * norm_weight, or silu(x[:, :K]) * x[:, K:]

One launch replaces the norm or activation kernel, the GEMM and the residual add of the unfused path. At a batch of a
few rows a GEMM is a matrix-vector product bound by reading the weight, so the Triton version is built as one: each
program owns a few output features, streams their weight rows once in wide chunks, and uses every chunk for all rows.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.activation import silu_and_mul_ref
from kernels.rms_norm import rms_norm_ref

MAX_ROWS = 16  # the largest batch fused_linear_triton takes: past it a tensor-core GEMM wins


def fused_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    gate_up: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unfused model path, rounding where it rounds: x [M, K] (or [M, 2K] with gate_up), weight [N, K], bias [N],
    norm_weight [K], residual [M, N] -> [M, N]."""
    _check_args(x, weight, bias, norm_weight, gate_up, residual)
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    if gate_up:
        x = silu_and_mul_ref(x)
    out = F.linear(x, weight, bias)
    return out if residual is None else out + residual


@triton.jit
def _fused_linear_kernel(
    x_ptr, weight_ptr, bias_ptr, norm_weight_ptr, residual_ptr, out_ptr, eps,
    M, stride_x, stride_r, stride_o,
    N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, GATE_UP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """Program n owns output features [n * BLOCK_N, (n + 1) * BLOCK_N) for all M rows. Products accumulate per K
    position in float32 and are summed once at the end. The prologue rounds to x's dtype where the unfused kernels
    round (normed row, norm output, silu, product), so results match the reference up to summation order."""
    # Tiles are 3-D, [rows, features, K], so that x and weight chunks load straight into the layout of the product.
    offs_m = tl.arange(0, BLOCK_M)[:, None, None]
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None]
    offs_k = tl.arange(0, BLOCK_K)[None, None, :]
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_x
    weight_rows = weight_ptr + offs_n.to(tl.int64) * K
    if NORM:  # every program finds the rows' RMS itself: x is a few KiB that stay in cache
        sum_sq = tl.zeros([BLOCK_M, 1, 1], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xf = tl.load(x_rows + k0 + offs_k, mask=m_mask & (k0 + offs_k < K), other=0.0).to(tl.float32)
            sum_sq += tl.sum(xf * xf, 2, keep_dims=True)
        inv_rms = tl.rsqrt(sum_sq / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        x = tl.load(x_rows + ks, mask=m_mask & k_mask, other=0.0)
        if NORM:
            normed = (x.to(tl.float32) * inv_rms).to(x.dtype)
            scale = tl.load(norm_weight_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
            x = (normed.to(tl.float32) * scale).to(x.dtype)
        if GATE_UP:
            up = tl.load(x_rows + K + ks, mask=m_mask & k_mask, other=0.0)
            gate = x.to(tl.float32)
            silu = (gate * tl.sigmoid(gate)).to(x.dtype)
            x = (silu.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
        w = tl.load(weight_rows + ks, mask=n_mask & k_mask, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)
    out = tl.sum(acc, 2)
    rows = tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    out_mask = (rows < M) & (cols < N)
    if HAS_BIAS:  # inside the GEMM's one rounding, as cuBLAS's bias epilogue
        out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    out = out.to(out_ptr.dtype.element_ty)
    if HAS_RESIDUAL:  # a separate add in the unfused path: round the product first
        residual = tl.load(residual_ptr + rows * stride_r + cols, mask=out_mask, other=0.0)
        out = (out.to(tl.float32) + residual.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows * stride_o + cols, out, mask=out_mask)


# Tuning knobs for _linear_config, the one place that picks tiles.
SM_COUNT = 132  # an H100; more programs than SMs only helps, so a smaller GPU loses nothing
PRODUCT_ELEMENTS = 8192  # float32 partial products per program: 64 registers a thread at 4 warps
MIN_BLOCK_K, MAX_BLOCK_K = 256, 1024  # weight elements read contiguously per row per step (512 B..2 KiB in bf16)


def _linear_config(m: int, n: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for an [m, k] x [k, n] product. Decode projections are narrow (N = 576..1152 for o/down
    on 0.5B-class models), so occupancy comes first: BLOCK_N is the largest power of two that still gives two
    programs per SM, capped by the register budget of the widest K step; BLOCK_K then spends what is left of the
    budget, so a lone row reads 2 KiB per weight row per step."""
    block_m = triton.next_power_of_2(max(m, 1))
    block_n = min(16, max(1, PRODUCT_ELEMENTS // (block_m * MIN_BLOCK_K)))
    while block_n > 1 and triton.cdiv(n, block_n) < 2 * SM_COUNT:
        block_n //= 2
    block_k = min(MAX_BLOCK_K, max(MIN_BLOCK_K, PRODUCT_ELEMENTS // (block_m * block_n)), triton.next_power_of_2(k))
    return block_n, block_k


def _check_args(x, weight, bias, norm_weight, gate_up, residual) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"fused_linear takes x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if norm_weight is not None and gate_up:
        raise ValueError("fused_linear applies either an RMSNorm or a SiLU-and-mul prologue, not both")
    (rows, width), (n, k) = x.shape, weight.shape
    if width != (2 * k if gate_up else k):
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} (gate_up={gate_up})")
    expected = {"bias": (n,), "norm_weight": (k,), "residual": (rows, n)}
    for name, tensor in {"bias": bias, "norm_weight": norm_weight, "residual": residual}.items():
        if tensor is not None and (tuple(tensor.shape) != expected[name] or tensor.dtype != x.dtype):
            raise ValueError(f"{name} must be {expected[name]} {x.dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight is {weight.dtype} but x is {x.dtype}")


def fused_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    gate_up: bool = False,
    residual: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """fused_linear in one launch, for at most MAX_ROWS (16) rows. The weight must be contiguous and the last dims of
    x and residual too; block_n/block_k (powers of two) override _linear_config's tiles."""
    _check_args(x, weight, bias, norm_weight, gate_up, residual)
    rows, (n, k) = x.shape[0], weight.shape
    if rows > MAX_ROWS:
        raise ValueError(f"fused_linear_triton takes at most {MAX_ROWS} rows, got {rows}")
    if not weight.is_contiguous() or x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("fused_linear_triton needs a contiguous weight and x/residual with contiguous rows")
    default_n, default_k = _linear_config(rows, n, k)
    block_n, block_k = block_n or default_n, block_k or default_k
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    _fused_linear_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else x, norm_weight if norm_weight is not None else x,
        residual if residual is not None else out, out, eps,
        rows, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        N=n, K=k, BLOCK_M=triton.next_power_of_2(max(rows, 1)), BLOCK_N=block_n, BLOCK_K=block_k,
        NORM=norm_weight is not None, GATE_UP=gate_up, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        num_warps=4,
    )
    return out


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    gate_up: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    fn = fused_linear_triton if x.is_cuda else fused_linear_ref
    return fn(x, weight, bias, norm_weight=norm_weight, eps=eps, gate_up=gate_up, residual=residual)
