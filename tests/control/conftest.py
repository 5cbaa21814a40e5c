"""Helpers for the control-plane tests: run the CLI in-process, write recipes and hand-made model files."""

from __future__ import annotations

import json
import struct
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from vdeploy.cli import main

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture) -> Callable[..., Result]:
    """Run `vdeploy ARGS...` in this process; returns the exit code and what it printed."""

    def run(*args: str) -> Result:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Write a recipe file (dedented) under tmp_path and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> int:
    """A real safetensors file with zero-filled tensors {name: (dtype, shape)}; returns the data bytes."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for dim in shape:
            n *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))
    return offset


def llama_config(**overrides) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
              "vocab_size": 256, "max_position_embeddings": 512, "tie_word_embeddings": False,
              "torch_dtype": "float32"}
    return {**config, **overrides}


@pytest.fixture
def hand_model(tmp_path: Path) -> Path:
    """A tiny llama folder written by hand (config.json + one safetensors file): 2 layers, hidden 64, GQA 4/2."""
    folder = tmp_path / "hand-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(llama_config()))
    h, i, v, kv = 64, 128, 256, 32
    tensors = {"model.embed_tokens.weight": ("F32", [v, h]), "lm_head.weight": ("F32", [v, h]),
               "model.norm.weight": ("F32", [h])}
    for layer in range(2):
        p = f"model.layers.{layer}."
        tensors |= {p + "self_attn.q_proj.weight": ("F32", [h, h]), p + "self_attn.k_proj.weight": ("F32", [kv, h]),
                    p + "self_attn.v_proj.weight": ("F32", [kv, h]), p + "self_attn.o_proj.weight": ("F32", [h, h]),
                    p + "mlp.gate_proj.weight": ("F32", [i, h]), p + "mlp.up_proj.weight": ("F32", [i, h]),
                    p + "mlp.down_proj.weight": ("F32", [h, i]), p + "input_layernorm.weight": ("F32", [h]),
                    p + "post_attention_layernorm.weight": ("F32", [h])}
    write_safetensors(folder / "model.safetensors", tensors)
    return folder
