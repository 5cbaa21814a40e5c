"""GGUF weights kept packed on the CPU.

A GGUF tensor is rows of blocks: 32 weights that share a scale (and, for Q4_1, a minimum). Q4_0 and Q4_1 blocks are
4-bit codes with one scale and one offset per 32 weights, which is exactly the group-wise layout of torch's packed int4
CPU matmul (`aten._weight_int4pack_mm_for_cpu`: w = (code - 8) * scale + zero, groups of 32 along K). Q8_0 blocks
hold 8-bit codes; each is split into its high and low nibbles, two 4-bit halves of one 2K-wide int4 matrix that the
same matmul reads against [x, x] (q + 128 = 16 * hi + lo, so d * q = 16d * (hi - 8) + d * (lo - 8) + 8d). Weights
stay at 4.5-5 (Q4) or 9 (Q8_0) bits each instead of float32's 32.

The matmul computes in bfloat16 (x and the scales are rounded to bfloat16, the output comes back as bfloat16; sums
run in float32): the only fast path of that op on AVX2 machines. The residual stream, norms and attention stay in the
model dtype. Types without such a mapping (K-quants, Q5, Q6) are dequantized at load as before.

Raw blocks arrive through the layer's weight_loader as uint8 rows ([out_features, bytes per row]); rows are output
features, so fused shards and llama.cpp's rope row order are handled by the loader unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vdeploy_engine.layers.embedding import LMHead, VocabEmbedding
from vdeploy_engine.layers.linear import Linear, sliced_parameter

BLOCK = 32  # weights per block of every type here, and the int4 matmul's group size
# Type name -> bytes per block of 32 weights.
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
PACKABLE = frozenset(BLOCK_BYTES)
COMPUTE_DTYPE = torch.bfloat16


def dequantize_blocks(raw: torch.Tensor, type_name: str) -> torch.Tensor:
    """raw uint8 [rows, blocks * block bytes] -> float32 [rows, blocks * 32]: the reference dequantization (the same
    values as gguf.quants.dequantize)."""
    codes, scale, offset = _codes(raw, type_name)
    return (codes.float() * scale[..., None] + offset[..., None]).flatten(1)


def _codes(raw: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each block's codes [rows, blocks, 32] with the float32 scale and offset [rows, blocks] that make them weights:
    w = code * scale + offset."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, BLOCK_BYTES[type_name])
    d = blocks[..., :2].contiguous().view(torch.float16)[..., 0].float()
    if type_name == "Q8_0":
        return blocks[..., 2:].contiguous().view(torch.int8), d, torch.zeros_like(d)
    body = blocks[..., 4:] if type_name == "Q4_1" else blocks[..., 2:]
    codes = torch.cat([body & 0xF, body >> 4], dim=-1)  # byte j holds weight j (low nibble) and j + 16 (high)
    if type_name == "Q4_1":
        return codes, d, blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
    return codes, d, -8 * d


class Int4Packed:
    """A GGUF matrix as the operands of torch's packed int4 CPU matmul: weight [N, K' / 2] uint8 and
    scales_and_zeros [K' / 32, N, 2] bfloat16, where K' = K (Q4 types) or 2K (Q8_0: hi nibbles, then lo nibbles,
    against x repeated twice)."""

    def __init__(self, raw: torch.Tensor, type_name: str):
        codes, scale, offset = _codes(raw, type_name)
        self.repeats = 1
        if type_name == "Q8_0":
            unsigned = codes.int() + 128
            codes = torch.cat([unsigned >> 4, unsigned & 0xF], dim=1)
            scale, offset = torch.cat([16 * scale, scale], dim=1), torch.cat([-128 * scale, 0 * scale], dim=1)
            self.repeats = 2
        self.weight = torch._convert_weight_to_int4pack_for_cpu(codes.flatten(1).int(), 1)
        zero = offset + 8 * scale  # the op computes (code - 8) * scale + zero
        self.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(COMPUTE_DTYPE).contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ W^T [M, N] in x's dtype."""
        xb = x.to(COMPUTE_DTYPE)
        if self.repeats == 2:
            xb = torch.cat([xb, xb], dim=-1)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.weight, BLOCK, self.scales_and_zeros).to(x.dtype)

    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales_and_zeros.nbytes


def raw_parameter(rows: int, cols: int, type_name: str) -> nn.Parameter:
    """An empty parameter for a [rows, cols] GGUF tensor's raw blocks, tagged for the sharded loader: rows are output
    features, bytes along input features (32 weights in each block's bytes)."""
    if cols % BLOCK:
        raise ValueError(f"{cols} input features are not a whole number of {BLOCK}-weight blocks")
    raw = torch.empty(rows, cols // BLOCK * BLOCK_BYTES[type_name], dtype=torch.uint8)
    return sliced_parameter(raw, output_dim=0, input_dim=1, packed_dim=1, packed_factor=BLOCK / BLOCK_BYTES[type_name])


class GGUFCPUMethod:
    """A Linear layer's weight as raw GGUF blocks of one type, packed for the int4 CPU matmul after loading."""

    def __init__(self, type_name: str):
        if type_name not in PACKABLE:
            raise ValueError(f"GGUF type {type_name} has no packed CPU path (packed: {', '.join(sorted(PACKABLE))})")
        self.type_name = type_name

    def create_weights(self, layer: Linear, in_features: int, out_features: int, bias: bool) -> None:
        layer.weight = raw_parameter(out_features, in_features, self.type_name)
        layer.bias = sliced_parameter(torch.empty(out_features), output_dim=0, input_dim=None) if bias else None

    def process_weights_after_loading(self, layer: Linear) -> None:
        layer.packed = Int4Packed(layer.weight.data, self.type_name)
        del layer.weight  # the raw blocks are not needed again
        layer.register_buffer("weight", layer.packed.weight, persistent=False)  # counted with the model's buffers
        layer.register_buffer("scales_and_zeros", layer.packed.scales_and_zeros, persistent=False)

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = layer.packed.matmul(x)
        return out if bias is None else out + bias


class PackedEmbedding(nn.Module):
    """A token embedding kept as raw GGUF blocks: a lookup dequantizes only the rows it gathers."""

    def __init__(self, vocab_size: int, dim: int, type_name: str):
        super().__init__()
        self.type_name, self.dtype = type_name, torch.get_default_dtype()  # the model's dtype while it is built
        self.weight = raw_parameter(vocab_size, dim, type_name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_blocks(F.embedding(ids, self.weight), self.type_name).to(self.dtype)


class PackedLMHead(nn.Module):
    """The LM head from raw GGUF blocks: its own (`weight`), or the embedding's when tied. Packed for the int4 matmul
    after loading; a tied head's raw blocks stay with the embedding for lookups."""

    def __init__(self, vocab_size: int, dim: int, type_name: str, tied_to: PackedEmbedding | None = None):
        super().__init__()
        self.type_name, self.tied_to = type_name, tied_to
        if tied_to is None:
            self.weight = raw_parameter(vocab_size, dim, type_name)
        self.packed: Int4Packed | None = None

    def process_weights_after_loading(self) -> None:
        raw = self.tied_to.weight if self.tied_to is not None else self.weight
        self.packed = Int4Packed(raw.data, self.type_name)
        if self.tied_to is None:
            del self.weight
        self.register_buffer("packed_weight", self.packed.weight, persistent=False)
        self.register_buffer("scales_and_zeros", self.packed.scales_and_zeros, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.packed.matmul(hidden)


def pack_gguf_model(model: nn.Module, tensor_types: dict[str, str]) -> set[str]:
    """Moves the model's linear layers, token embedding and LM head onto packed GGUF weights wherever the file's
    tensor types allow (`tensor_types`: HF checkpoint name -> GGUF type name); a fused layer packs when all its shards
    share one packable type. Returns the checkpoint names to load as raw blocks; the rest are dequantized."""
    types_by_param: dict[str, set[str]] = {}
    for name, type_name in tensor_types.items():
        target = model.map_checkpoint_name(name)
        if target is not None:
            types_by_param.setdefault(target[0], set()).add(type_name)

    def packable(param_name: str) -> str | None:
        types = types_by_param.get(param_name, set())
        return next(iter(types)) if len(types) == 1 and types <= PACKABLE else None

    packed_params: set[str] = set()
    for module_name, module in list(model.named_modules()):
        type_name = packable(f"{module_name}.weight")
        if isinstance(module, Linear) and type_name:
            module.set_quant_method(GGUFCPUMethod(type_name))
        elif isinstance(module, VocabEmbedding) and type_name:
            _replace(model, module_name, PackedEmbedding(*module.weight.shape, type_name))
        elif isinstance(module, LMHead) and module.tied:
            embedding = next((m for m in model.modules() if isinstance(m, PackedEmbedding)), None)
            if embedding is not None:
                _replace(model, module_name, PackedLMHead(*module.weight.shape, embedding.type_name, embedding))
            continue
        elif isinstance(module, LMHead) and type_name:
            _replace(model, module_name, PackedLMHead(*module.weight.shape, type_name))
        else:
            continue
        packed_params.add(f"{module_name}.weight")
    return {name for name in tensor_types if (model.map_checkpoint_name(name) or ("",))[0] in packed_params}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
