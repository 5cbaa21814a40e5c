"""GGUF files: a transformers config from the metadata, and the weights dequantized to float32 under HF tensor names.

The header (metadata, tensor table) comes from vdeploy's standard-library reader, which skips the vocabulary instead
of parsing it (gguf.GGUFReader takes seconds on it); each tensor's bytes are then memory-mapped and dequantized with
the `gguf` package, one tensor at a time.

llama.cpp's converter stores a llama model's attn_q/attn_k rows permuted for its own rope layout; the permutation
is undone here so the weights match HF's (NeoX-style) rotary. Other architectures (qwen2, qwen3, gemma3) are stored
unpermuted. llama.cpp stores Gemma's norm weights as 1 + w (its RMSNorm multiplies by the weight alone); they are
given back as HF's w.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vdeploy_engine.gguf_header import GGUFError, GGUFHeader, GGUFTensor, read_gguf_header
from vdeploy_engine.loader.errors import ModelLoadError

# GGUF `general.architecture` -> (HF architecture, transformers config class name, q/k rows permuted by llama.cpp).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", True),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", False),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", False),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", False),
}
# Gemma 3's sliding layers keep the default rotary base; the file's rope.freq_base is the global layers' one.
_GEMMA3_LOCAL_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Gemma 3 has four norms a layer: llama.cpp's ffn_norm is the one before the MLP, not after attention.
_GEMMA3_BLOCK_TENSORS = {
    **_BLOCK_TENSORS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@functools.lru_cache(maxsize=4)
def _header(path: str, mtime_ns: int) -> GGUFHeader:
    try:
        return read_gguf_header(path)
    except GGUFError as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file: {exc}") from None


def gguf_header(path: Path) -> GGUFHeader:
    """The file's metadata and tensor table, read once (the config and the weights both need it)."""
    return _header(str(path), path.stat().st_mtime_ns)


def _architecture(header: GGUFHeader, path: Path) -> str:
    arch = header.metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(_ARCHITECTURES))})"
        )
    return arch


def gguf_hf_config(path: Path) -> Any:
    """A transformers config equivalent to the GGUF metadata."""
    import transformers

    header = gguf_header(path)
    meta, arch = header.metadata, _architecture(header, path)
    hf_arch, config_class, _ = _ARCHITECTURES[arch]

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks '{arch}.{key}'")
        return value

    heads, hidden = get("attention.head_count"), get("embedding_length")
    rope = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        rope.update(rope_type=scaling, factor=float(get("rope.scaling.factor")))
        if f"{arch}.rope.scaling.original_context_length" in meta:
            rope["original_max_position_embeddings"] = int(meta[f"{arch}.rope.scaling.original_context_length"])
    freq_factors = next((t for t in header.tensors if t.name == "rope_freqs.weight"), None)
    extra = {"rope_freq_factors": _read_tensor(path, freq_factors).tolist()} if freq_factors else {}
    head_dim = get("attention.key_length", hidden // heads)
    if arch == "gemma3":
        # transformers' default query scale (256) is head_dim for every Gemma 3 size; layer_types follow the config
        # class's default pattern (five sliding layers, then a global one), as in llama.cpp.
        extra.update(sliding_window=get("attention.sliding_window"), query_pre_attn_scalar=head_dim)
        rope = {"full_attention": rope, "sliding_attention": dict(_GEMMA3_LOCAL_ROPE)}
    token_ids = {
        f"{role}_token_id": meta[f"tokenizer.ggml.{role}_token_id"]
        for role in ("bos", "eos", "pad")
        if f"tokenizer.ggml.{role}_token_id" in meta
    }
    return getattr(transformers, config_class)(
        architectures=[hf_arch],
        vocab_size=meta.get("tokenizer.ggml.tokens") or get("vocab_size"),  # the reader gives an array's length
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=get("context_length"),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_parameters=rope,
        tie_word_embeddings=not any(t.name == "output.weight" for t in header.tensors),
        **token_ids,
        **extra,
    )


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """GGUF tensor name -> HF checkpoint name, or None when it has no HF counterpart we know."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{kind}"
    block_tensors = _GEMMA3_BLOCK_TENSORS if arch == "gemma3" else _BLOCK_TENSORS
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match and match.group(2) in block_tensors:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{block_tensors[part]}.{kind}"
    return None


def _unpermute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp interleaves each head's rotary halves; HF keeps them as two contiguous halves."""
    out, cols = weight.shape[0], weight.shape[1:]
    return weight.reshape(heads, out // heads // 2, 2, *cols).transpose(1, 2).reshape(out, *cols)


def _read_tensor(path: Path, tensor: GGUFTensor) -> torch.Tensor:
    """One tensor, dequantized to float32, in numpy's (= HF's) dimension order."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    kind = GGMLQuantizationType[tensor.type_name]
    block_elements, block_bytes = GGML_QUANT_SIZES[kind]
    # Rows of packed blocks: numpy's shape is ggml's reversed, with the innermost dimension in bytes.
    row_bytes = tensor.shape[0] // block_elements * block_bytes
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(tensor.n_bytes,))
    try:
        values = dequantize(raw.reshape(*reversed(tensor.shape[1:]), row_bytes), kind)
    except Exception as exc:  # a type the gguf package cannot dequantize
        raise ModelLoadError(
            f"{path}: tensor {tensor.name!r} ({tensor.type_name}) cannot be dequantized: {exc}"
        ) from None
    return torch.from_numpy(values if values.flags.writeable else values.copy())  # F32 is a view of the map


def iter_gguf(path: Path, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) pairs, dequantizing one tensor at a time."""
    header = gguf_header(path)
    arch = _architecture(header, path)
    permuted = _ARCHITECTURES[arch][2]
    rope_heads = {"q_proj": hf_config.num_attention_heads, "k_proj": hf_config.num_key_value_heads}
    for tensor in header.tensors:
        if tensor.name == "rope_freqs.weight":  # already in the config (rope_freq_factors)
            continue
        name = hf_tensor_name(tensor.name, arch)
        if name is None:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} has no place in a {arch} model")
        weight = _read_tensor(path, tensor)
        projection = name.split(".")[-2]
        if permuted and projection in rope_heads:
            weight = _unpermute_rope_rows(weight, rope_heads[projection])
        if arch == "gemma3" and name.endswith("norm.weight"):
            weight = weight - 1.0
        yield name, weight
