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

from vdeploy_kernels.activation import silu_and_mul_ref
from vdeploy_kernels.launch import pdl, wait_for_previous
from vdeploy_kernels.rms_norm import rms_norm_ref

MAX_ROWS = 16  # the most rows the kernel takes (registers); cuBLAS already wins the wide projections from 4 rows


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
    PDL: tl.constexpr,
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
    rows = tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    out_mask = (rows < M) & (cols < N)
    # What no earlier kernel writes is read before waiting for the one that writes x: the first weight chunk (the long
    # read; with PDL it overlaps the previous kernel's tail), the bias and a one-step norm's weight. The weight is then
    # read one chunk ahead of its use, and the residual with x, so no read waits on the arithmetic.
    w = tl.load(weight_rows + offs_k, mask=n_mask & (offs_k < K), other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    if NORM and K <= BLOCK_K:
        scale = tl.load(norm_weight_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    wait_for_previous(PDL)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + rows * stride_r + cols, mask=out_mask, other=0.0)
    if NORM and K > BLOCK_K:  # K takes several steps: a first pass finds each row's RMS (x is a few KiB, in cache)
        sum_sq = tl.zeros([BLOCK_M, 1, 1], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xf = tl.load(x_rows + k0 + offs_k, mask=m_mask & (k0 + offs_k < K), other=0.0).to(tl.float32)
            sum_sq += tl.sum(xf * xf, 2, keep_dims=True)
        inv_rms = tl.rsqrt(sum_sq / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        if K > BLOCK_K:
            w_next = tl.load(weight_rows + BLOCK_K + ks, mask=n_mask & (BLOCK_K + ks < K), other=0.0)
        x = tl.load(x_rows + ks, mask=m_mask & k_mask, other=0.0)
        if NORM:
            if K > BLOCK_K:
                scale = tl.load(norm_weight_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
            else:  # the whole row is in this one step
                xf = x.to(tl.float32)
                inv_rms = tl.rsqrt(tl.sum(xf * xf, 2, keep_dims=True) / K + eps)
            normed = (x.to(tl.float32) * inv_rms).to(x.dtype)
            x = (normed.to(tl.float32) * scale).to(x.dtype)
        if GATE_UP:
            up = tl.load(x_rows + K + ks, mask=m_mask & k_mask, other=0.0)
            gate = x.to(tl.float32)
            silu = (gate * tl.sigmoid(gate)).to(x.dtype)
            x = (silu.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
        acc += x.to(tl.float32) * w.to(tl.float32)
        if K > BLOCK_K:
            w = w_next
    out = tl.sum(acc, 2)
    if HAS_BIAS:  # inside the GEMM's one rounding, as cuBLAS's bias epilogue
        out += bias
    out = out.to(out_ptr.dtype.element_ty)
    if HAS_RESIDUAL:  # a separate add in the unfused path: round the product first
        out = (out.to(tl.float32) + residual.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows * stride_o + cols, out, mask=out_mask)


# Tuning knobs for _linear_config, the one place that picks tiles (bench/fused_linear_tiles.py sweeps them on a GPU).
SM_COUNT = 132  # an H100 or H200
# Float32 products (BLOCK_M * BLOCK_N * BLOCK_K) a 4-warp program takes in one step, when that step is all of K: the
# weight tile then is 256 bf16 a thread at M = 1, and no accumulator is carried from step to step.
ONE_STEP_PRODUCTS = 32768
# When K takes several steps, the [M, N, K] accumulator lives across them: 64 float32 registers a thread.
CARRIED_PRODUCTS = 8192
MAX_BLOCK_N = 4
# Threads take 16 B (8 bf16) of a weight row each, warps side by side along K, so x ([M, 1, K]) and weight ([1, N, K])
# tiles load in the same layout. Narrower steps put warps across rows, and the two layouts then differ, converted through
# shared memory on every step.
MIN_BLOCK_K = 8 * 32 * 4


def _linear_config(m: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an [m, k] x [k, n] product.

    All of K in one step when the budget allows: every weight read of a program is issued at once (before it waits
    for x, with PDL), and the RMSNorm prologue needs no first pass over x. BLOCK_N is at most 4, halved until every SM
    has a program: decode projections are narrow (N = 576..1152 for o/down on 0.5B-class models).

    From the sweep on an H200 at M = 1 with PDL (bench/results/fused-linear-tiles-h200-pdl.json): Qwen2.5-0.5B's down
    projection takes 4.4 us in one step of 8192 (6.6 us in two steps of 4096 with 8 warps, the earlier choice);
    gate_up's best tile is BLOCK_N = 4 (6.3 us; 7.0 us at 8); qkv's best, BLOCK_N = 8, is 0.1-0.2 us ahead of 4.
    Larger M is unmeasured. At 16 rows a carried step of the narrowest layout (BLOCK_N = 1, BLOCK_K = 1024) takes
    twice the carried budget (255 registers a thread): hence MAX_ROWS."""
    block_m = triton.next_power_of_2(max(m, 1))
    one_step = max(triton.next_power_of_2(k), MIN_BLOCK_K)
    if block_m * one_step <= ONE_STEP_PRODUCTS:
        block_k = one_step
        block_n = min(MAX_BLOCK_N, ONE_STEP_PRODUCTS // (block_m * block_k))
    else:
        block_k = max(MIN_BLOCK_K, CARRIED_PRODUCTS // block_m)
        block_n = 1
    while block_n > 1 and triton.cdiv(n, block_n) < SM_COUNT:
        block_n //= 2
    return block_n, block_k, 4


def _check_args(x, weight, bias, norm_weight, gate_up, residual) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        shapes = f"{tuple(x.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"fused_linear takes x [M, K] and weight [N, K], got {shapes}")
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
    num_warps: int | None = None,
) -> torch.Tensor:
    """fused_linear in one launch, for at most MAX_ROWS (16) rows. The weight must be contiguous and the last dims of
    x and residual too; block_n/block_k (powers of two) and num_warps override what _linear_config picks."""
    _check_args(x, weight, bias, norm_weight, gate_up, residual)
    rows, (n, k) = x.shape[0], weight.shape
    if rows > MAX_ROWS:
        raise ValueError(f"fused_linear_triton takes at most {MAX_ROWS} rows, got {rows}")
    if not weight.is_contiguous() or x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("fused_linear_triton needs a contiguous weight and x/residual with contiguous rows")
    default_n, default_k, default_warps = _linear_config(rows, n, k)
    block_n, block_k, num_warps = block_n or default_n, block_k or default_k, num_warps or default_warps
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    use_pdl = pdl(x)
    _fused_linear_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else x, norm_weight if norm_weight is not None else x,
        residual if residual is not None else out, out, eps,
        rows, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        N=n, K=k, BLOCK_M=triton.next_power_of_2(max(rows, 1)), BLOCK_N=block_n, BLOCK_K=block_k,
        NORM=norm_weight is not None, GATE_UP=gate_up, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        PDL=use_pdl, num_warps=num_warps, launch_pdl=use_pdl,
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
    """The Triton GEMV for CUDA batches of at most MAX_ROWS rows; the reference (cuBLAS and the separate kernels on a
    GPU) for CPU tensors and larger batches, such as prefills, where a tensor-core GEMM wins."""
    fn = fused_linear_triton if x.is_cuda and x.shape[0] <= MAX_ROWS else fused_linear_ref
    return fn(x, weight, bias, norm_weight=norm_weight, eps=eps, gate_up=gate_up, residual=residual)
