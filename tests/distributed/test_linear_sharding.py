"""Linear layers cut into tensor-parallel ranks: each rank's loader takes its slice of the checkpoint tensors, and the
ranks' outputs put together are the unsharded layer's output. No process group: a TPGroup(rank, size) is enough to
build one rank's layer, and the test does the all-gather / all-reduce itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vdeploy_engine.distributed.parallel import TPGroup
from vdeploy_engine.layers.linear import Linear, WeightShapeError, sliced_parameter

torch.manual_seed(0)
HEAD = 4


def _qkv(tp: TPGroup, kv_heads: int) -> Linear:
    """q/k/v of 4 query heads over `kv_heads` KV heads, KV replicated when there are fewer heads than ranks."""
    q, kv = 4 * HEAD, kv_heads * HEAD
    replicas = max(1, tp.size // kv_heads)
    shards = {"q": q, "k": kv, "v": kv}
    return Linear(8, q + 2 * kv, True, shards, parallel="column", tp=tp, replicas={"k": replicas, "v": replicas})


def _load(layer: Linear, tensors: dict[str, torch.Tensor]) -> Linear:
    for name, tensor in tensors.items():
        param_name, _, shard = name.partition(":")
        param = getattr(layer, param_name)
        param.weight_loader(param, tensor, shard or None)
    return layer


@pytest.mark.parametrize(("tp_size", "kv_heads"), [(1, 2), (2, 2), (4, 2), (4, 1)])
def test_column_parallel_qkv_ranks_hold_their_heads(tp_size, kv_heads):
    full = {f"{p}:{s}": torch.randn((4 if s == "q" else kv_heads) * HEAD, *((8,) if p == "weight" else ()))
            for s in "qkv" for p in ("weight", "bias")}
    x = torch.randn(3, 8)
    want = {s: x @ full[f"weight:{s}"].T + full[f"bias:{s}"] for s in "qkv"}
    ranks = [_load(_qkv(TPGroup(r, tp_size), kv_heads), full) for r in range(tp_size)]
    for rank, layer in enumerate(ranks):
        q, k, v = layer(x).split(list(layer.shards_local.values()), dim=-1)
        assert q.shape[1] == 4 * HEAD // tp_size
        torch.testing.assert_close(q, want["q"].chunk(tp_size, dim=1)[rank])
        kv_part = rank * kv_heads // tp_size  # the KV head this rank's query heads attend to
        torch.testing.assert_close(k, want["k"].chunk(min(tp_size, kv_heads), dim=1)[kv_part])
        torch.testing.assert_close(v, want["v"].chunk(min(tp_size, kv_heads), dim=1)[kv_part])


@pytest.mark.parametrize("tp_size", [2, 4])
def test_row_parallel_partial_sums_add_up_with_the_bias_once(tp_size):
    weight, bias, x = torch.randn(6, 16), torch.randn(6), torch.randn(3, 16)
    partials = []
    for rank in range(tp_size):
        layer = _load(Linear(16, 6, True, parallel="row", tp=TPGroup(rank, tp_size)), {"weight": weight, "bias": bias})
        assert layer.weight.shape == (6, 16 // tp_size)
        local_x = x.chunk(tp_size, dim=1)[rank]
        partials.append(layer.quant_method.apply(layer, local_x, layer.bias if rank == 0 else None))
    torch.testing.assert_close(sum(partials), x @ weight.T + bias)


class _PackedMethod:
    """A stand-in quantized format: int32 words each packing 4 values along the output axis, with a per-shard scalar
    scale; only the tags matter to the loader."""

    def create_weights(self, layer, in_features, out_features, bias):
        layer.qweight = sliced_parameter(
            torch.empty(out_features // 4, in_features, dtype=torch.int32), 0, 1, packed_dim=0, packed_factor=4
        )
        layer.scale = sliced_parameter(torch.empty(len(layer.shards)), None, None)
        layer.bias = None


def test_packed_and_per_shard_parameters_slice_by_their_tags():
    shards = {"gate": 16, "up": 16}
    packed = {s: torch.arange(4 * 8).reshape(4, 8).int() + 100 * i for i, s in enumerate(shards)}
    layer = Linear(8, 32, shards=shards, quant_method=_PackedMethod(), parallel="column", tp=TPGroup(1, 2))
    for i, s in enumerate(shards):
        layer.weight_loader(layer.qweight, packed[s], s)
        layer.weight_loader(layer.scale, torch.tensor(float(i + 1)), s)
    torch.testing.assert_close(layer.qweight.data, torch.cat([packed["gate"][2:], packed["up"][2:]]))
    torch.testing.assert_close(layer.scale.data, torch.tensor([1.0, 2.0]))


def test_uneven_split_and_wrong_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"q \(12\) is not divisible by the tensor-parallel size 5"):
        Linear(8, 36, shards={"q": 12, "k": 12, "v": 12}, parallel="column", tp=TPGroup(0, 5))
    layer = Linear(8, 12, parallel="column", tp=TPGroup(0, 2))
    with pytest.raises(WeightShapeError, match=r"expected shape \(6, 8\), got \(6, 9\)"):
        layer.weight_loader(layer.weight, torch.randn(12, 9))
    assert isinstance(layer.weight, nn.Parameter) and layer.weight.output_dim == 0
