"""RMSNorm, optionally fused with the residual add that precedes it."""

import torch
import triton
import triton.language as tl

from vdeploy_kernels.launch import pdl, wait_for_previous


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Returns norm(x) * weight; with `residual`, x += residual first and returns (normed, new residual)."""
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return out if residual is None else (out, residual)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    """One program per row. Rounds where the reference rounds (the sum, the normalised row) so results match it."""
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    normed = (xf * tl.rsqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)).to(x.dtype)
    out = normed.to(tl.float32) * tl.load(weight_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rms_norm in Triton: one pass over x (and residual), writing the normed row (and the new residual)."""
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden).contiguous()
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(rows.shape, dtype=torch.promote_types(sum_dtype, weight.dtype), device=x.device)
    res_in = rows if residual is None else residual.reshape(-1, hidden).contiguous()
    res_out = rows if residual is None else torch.empty(rows.shape, dtype=sum_dtype, device=x.device)
    block = triton.next_power_of_2(hidden)
    use_pdl = pdl(x)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, res_in, weight, out, res_out, eps,
        rows.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
        HIDDEN=hidden, BLOCK=block, ADD_RESIDUAL=residual is not None,
        num_warps=min(max(block // 256, 1), 8),  # about 8 elements per thread, 8 warps at most
        PDL=use_pdl, launch_pdl=use_pdl,
    )
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    fn = rms_norm_triton if x.is_cuda else rms_norm_ref
    return fn(x, weight, eps, residual)
