"""RMSNorm over ops.rms_norm, which fuses the residual add that precedes each norm in a pre-norm block."""

from __future__ import annotations

import torch
from torch import nn

from vdeploy_kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with `residual`, returns (norm(x + residual), x + residual)."""
        return ops.rms_norm(x, self.weight, self.eps, residual)
