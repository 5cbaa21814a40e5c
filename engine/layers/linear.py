"""Linear layers. Each owns its parameters through a `quant_method` (create the weights, apply them), so quantized
formats slot in as new methods without touching the models, and each parameter carries a `weight_loader` that
places a checkpoint tensor into it: fused layers (q/k/v, gate/up) take one shard at a time, which is also where a
tensor-parallel rank will later slice its part.

After loading, `process_weights_after_loading` lets each method prepare its weights for the device. On the CPU the
plain method moves float32 weights into oneDNN's blocked layout: a decode step streams every weight from memory, and
oneDNN reads that layout much faster than MKL reads a plain matrix at decode batch sizes (SmolLM2-135M, 16 rows, AVX2,
2 threads: 97 -> 58 ms of GEMMs a step). Same float32 arithmetic in another summation order (~1e-6 relative)."""

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

    def process_weights_after_loading(self, layer: Linear) -> None: ...

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor: ...


class UnquantizedMethod:
    """Plain dense weights in the model dtype; on the CPU, float32 ones end up in oneDNN's layout."""

    def create_weights(self, layer: Linear, in_features: int, out_features: int, bias: bool) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        layer.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def process_weights_after_loading(self, layer: Linear) -> None:
        if onednn_packs(layer.weight):  # the plain copy is given up: memory stays the same
            layer.weight = nn.Parameter(onednn_pack(layer.weight), requires_grad=False)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, layer.weight, layer.bias)


def onednn_packs(weight: torch.Tensor) -> bool:
    """Whether `weight` is a plain float32 CPU matrix that onednn_pack can take."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not weight.is_mkldnn
        and torch.backends.mkldnn.is_available()
    )


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> the same values in the blocked layout oneDNN picks for batches of 16 rows. It serves any row
    count; measured on decode steps, hints of 16 and up give the same speed and a hint of 1 a slower layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 16)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight^T + bias, for a plain weight or one from onednn_pack."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def process_weights_after_loading(model: nn.Module) -> None:
    """Lets every layer that has the hook (Linear layers, the LM head) prepare its loaded weights for its device."""
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()


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

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """For parameters without a layer-specific loader (norms, embeddings, learned positions)."""
    if param.shape != loaded.shape:
        raise WeightShapeError(f"expected shape {tuple(param.shape)}, got {tuple(loaded.shape)}")
    param.data.copy_(loaded)
