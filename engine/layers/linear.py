"""Linear layers. Each owns its parameters through a `quant_method` (create the weights, apply them), so quantized
formats slot in as new methods without touching the models, and each parameter carries a `weight_loader` that
places a checkpoint tensor into it: fused layers (q/k/v, gate/up) take one shard at a time.

Tensor parallelism (vLLM's split): the LAYER owns sharding. A column-parallel layer keeps 1/tp of each fused shard's
output rows, a row-parallel one 1/tp of the input columns (its partial sums are all-reduced). The quant method creates
the rank-local parameters and tags each with the axes the loader slices: `output_dim` / `input_dim` (None: not split
along that axis), and `packed_dim` / `packed_factor` when several values share one stored element. The loader slices
a checkpoint tensor by those tags only, so any format shards the same way.

After loading, `process_weights_after_loading` lets each method prepare its weights for the device. On the CPU the
plain method moves float32 weights into oneDNN's blocked layout: a decode step streams every weight from memory, and
oneDNN reads that layout much faster than MKL reads a plain matrix at decode batch sizes (SmolLM2-135M, 16 rows, AVX2,
2 threads: 97 -> 58 ms of GEMMs a step). Same float32 arithmetic in another summation order (~1e-6 relative)."""

from __future__ import annotations

from itertools import accumulate
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vdeploy_engine.distributed.parallel import SINGLE, TPGroup
from vdeploy_kernels import ops

Parallel = Literal["column", "row"]

class WeightShapeError(ValueError):
    """A checkpoint tensor does not fit the parameter it maps to."""


class QuantMethod(Protocol):
    def create_weights(self, layer: Linear, in_features: int, out_features: int, bias: bool) -> None:
        """Creates this rank's parameters (`in_features`/`out_features` are rank-local) with their slicing tags."""

    def process_weights_after_loading(self, layer: Linear) -> None: ...

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


def sliced_parameter(
    data: torch.Tensor, output_dim: int | None, input_dim: int | None, packed_dim: int | None = None,
    packed_factor: int = 1,
) -> nn.Parameter:
    """A frozen parameter tagged with the axes a sharded loader slices (see the module docstring)."""
    param = nn.Parameter(data, requires_grad=False)
    param.output_dim, param.input_dim = output_dim, input_dim
    param.packed_dim, param.packed_factor = packed_dim, packed_factor
    return param


class UnquantizedMethod:
    """Plain dense weights in the model dtype; on the CPU, float32 ones end up in oneDNN's layout."""

    def create_weights(self, layer: Linear, in_features: int, out_features: int, bias: bool) -> None:
        layer.weight = sliced_parameter(torch.empty(out_features, in_features), output_dim=0, input_dim=1)
        layer.bias = sliced_parameter(torch.empty(out_features), output_dim=0, input_dim=None) if bias else None

    def process_weights_after_loading(self, layer: Linear) -> None:
        if onednn_packs(layer.weight):  # the plain copy is given up: memory stays the same
            layer.weight = nn.Parameter(onednn_pack(layer.weight), requires_grad=False)

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return dense_linear(x, layer.weight, bias)


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
    """y = x W^T + b. `shards` names the outputs fused into this layer, in order, with their full (checkpoint) sizes
    (e.g. {"q": 512, "k": 128, "v": 128}); a checkpoint tensor for one of them is loaded with its shard name.

    `parallel="column"` splits every shard's outputs over the ranks of `tp`; `replicas` says how many consecutive
    ranks hold the same slice of a shard (KV heads when there are fewer than ranks). `parallel="row"` splits the
    inputs and all-reduces the partial outputs; its bias is added once, by rank 0, before the sum."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        shards: dict[str, int] | None = None,
        quant_method: QuantMethod | None = None,
        parallel: Parallel | None = None,
        tp: TPGroup = SINGLE,
        replicas: dict[str, int] | None = None,
    ):
        super().__init__()
        self.parallel, self.tp = parallel, tp
        self.shards = shards or {}
        if self.shards and sum(self.shards.values()) != out_features:
            raise ValueError(f"shard sizes {self.shards} do not add up to {out_features}")
        self.replicas = replicas or {}
        if parallel == "column":
            local = {name: tp.split(size * self.replicas.get(name, 1), name) for name, size in self.shards.items()}
            self.shards_local = local
            out_features = sum(local.values()) if local else tp.split(out_features, "output features")
        else:
            self.shards_local = dict(self.shards)
        if parallel == "row":
            in_features = tp.split(in_features, "input features")
        self.in_features, self.out_features = in_features, out_features  # this rank's
        starts = accumulate(self.shards_local.values(), initial=0)
        self._shard_rows = {
            name: (start, size) for (name, size), start in zip(self.shards_local.items(), starts, strict=False)
        }
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_weights(self, in_features, out_features, bias)
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader
            param.shard_names = tuple(self.shards)  # the loader checks that every shard arrived

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        """Copies this rank's slice of a checkpoint tensor (of one fused shard, or of the whole layer) into `param`."""
        output_dim, input_dim = getattr(param, "output_dim", None), getattr(param, "input_dim", None)
        if self.tp.size > 1:
            if self.parallel == "column" and output_dim is not None:
                if self.shards and shard is None:
                    raise WeightShapeError("a fused tensor-parallel layer loads one shard at a time")
                replicas = self.replicas.get(shard, 1)
                loaded = _rank_slice(loaded, output_dim, self.tp.rank // replicas, self.tp.size // replicas)
            elif self.parallel == "row" and input_dim is not None:
                loaded = _rank_slice(loaded, input_dim, self.tp.rank, self.tp.size)
        target = param.data
        if shard is not None:
            if output_dim is None:  # one value per fused shard (say, a per-tensor scale)
                target = target[list(self.shards).index(shard)]
            else:
                start, size = self._shard_rows[shard]
                packing = param.packed_factor if param.packed_dim == output_dim else 1
                target = target.narrow(output_dim, start // packing, size // packing)
        if target.shape != loaded.shape:
            raise WeightShapeError(f"expected shape {tuple(target.shape)}, got {tuple(loaded.shape)}")
        target.copy_(loaded)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def fused_with_residual(self, x: torch.Tensor, residual: torch.Tensor, **fused: Any) -> torch.Tensor:
        """ops.fused_linear(x, weight, bias, residual=residual, **fused) for plain weights: a decode step's last
        projection of a block. Row-parallel, rank 0 adds the bias and the residual once and the ranks' sum is
        all-reduced (captured with the rest of the step in a CUDA graph)."""
        first = self.parallel != "row" or self.tp.rank == 0
        out = ops.fused_linear(x, self.weight, self.bias if first else None, residual=residual if first else None, **fused)
        return self.tp.all_reduce(out) if self.parallel == "row" else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel != "row" or self.tp.size == 1:
            return self.quant_method.apply(self, x, self.bias)
        return self.tp.all_reduce(self.quant_method.apply(self, x, self.bias if self.tp.rank == 0 else None))


def _rank_slice(loaded: torch.Tensor, dim: int, part: int, parts: int) -> torch.Tensor:
    """Part `part` of `parts` equal slices of `loaded` along `dim` (stored elements, so packing needs no care)."""
    if loaded.shape[dim] % parts:
        raise WeightShapeError(f"dimension {dim} of shape {tuple(loaded.shape)} does not split into {parts} parts")
    size = loaded.shape[dim] // parts
    return loaded.narrow(dim, part * size, size)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """For parameters without a layer-specific loader (norms, embeddings, learned positions)."""
    if param.shape != loaded.shape:
        raise WeightShapeError(f"expected shape {tuple(param.shape)}, got {tuple(loaded.shape)}")
    param.data.copy_(loaded)
