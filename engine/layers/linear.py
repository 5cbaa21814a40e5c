"""Linear layers. Each owns its parameters through a `quant_method` (create the weights, apply them), so quantized
formats slot in as new methods without touching the models, and each parameter carries a `weight_loader` that
places a checkpoint tensor into it: fused layers (q/k/v, gate/up) take one shard at a time, which is also where a
tensor-parallel rank will later slice its part."""

from __future__ import annotations

from itertools import accumulate
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class WeightShapeError(ValueError):
    """A checkpoint tensor does not fit the parameter it maps to."""


class QuantMethod(Protocol):
    def create_weights(self, layer: Linear, in_features: int, out_features: int, bias: bool) -> None: ...

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor: ...


class UnquantizedMethod:
    """Plain dense weights in the model dtype."""

    def create_weights(self, layer: Linear, in_features: int, out_features: int, bias: bool) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        layer.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class Linear(nn.Module):
    """y = x W^T + b. `shards` names the outputs fused into this layer, in order, with their sizes
    (e.g. {"q": 512, "k": 128, "v": 128}); a checkpoint tensor for one of them is loaded with its shard name."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        shards: dict[str, int] | None = None,
        quant_method: QuantMethod | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.shards = shards or {}
        if self.shards and sum(self.shards.values()) != out_features:
            raise ValueError(f"shard sizes {self.shards} do not add up to {out_features}")
        starts = accumulate(self.shards.values(), initial=0)
        self._shard_rows = {
            name: (start, size) for (name, size), start in zip(self.shards.items(), starts, strict=False)
        }
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_weights(self, in_features, out_features, bias)
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader
            param.shard_names = tuple(self.shards)  # the loader checks that every shard arrived

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        target = param.data
        if shard is not None:
            target = target.narrow(0, *self._shard_rows[shard])
        if target.shape != loaded.shape:
            raise WeightShapeError(f"expected shape {tuple(target.shape)}, got {tuple(loaded.shape)}")
        target.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """For parameters without a layer-specific loader (norms, embeddings, learned positions)."""
    if param.shape != loaded.shape:
        raise WeightShapeError(f"expected shape {tuple(param.shape)}, got {tuple(loaded.shape)}")
    param.data.copy_(loaded)
