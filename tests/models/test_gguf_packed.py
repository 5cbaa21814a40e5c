"""GGUF kept packed on the CPU (quantization: gguf): block decoding against the gguf package, the int4 matmul against
the dequantized matrix, tiny Q4_0/Q4_1/Q8_0 files against their dequantized (float32) load, and the real SmolLM2
Q4_1 file's greedy tokens against the dequantized path."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch

from tests.fixtures.tiny_models import save_tiny_gguf
from tests.models.harness import forward_no_cache
from vdeploy_engine import LLM, SamplingParams
from vdeploy_engine.config import EngineConfig
from vdeploy_engine.layers.linear import Linear, process_weights_after_loading
from vdeploy_engine.layers.quantization.gguf import (
    GGUFCPUMethod,
    Int4Packed,
    PackedEmbedding,
    PackedLMHead,
    dequantize_blocks,
)
from vdeploy_engine.loader import load_hf_config, load_model

TYPES = ["Q4_0", "Q4_1", "Q8_0"]


def _raw(type_name: str, rows: int = 48, cols: int = 96, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Random weights quantized by the gguf package: raw blocks as uint8 rows, and gguf's own dequantization."""
    weights = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    kind = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(weights, kind)
    return torch.from_numpy(raw.copy()), gguf.quants.dequantize(raw, kind)


@pytest.mark.parametrize("type_name", TYPES)
def test_blocks_decode_to_the_gguf_package_values(type_name):
    raw, want = _raw(type_name)
    torch.testing.assert_close(dequantize_blocks(raw, type_name), torch.from_numpy(want), atol=0, rtol=0)


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("rows", [1, 5, 32])
def test_int4_matmul_computes_x_times_the_dequantized_weight(type_name, rows):
    raw, dequantized = _raw(type_name)
    x = torch.randn(rows, dequantized.shape[1])
    got = Int4Packed(raw, type_name).matmul(x)
    want = x @ torch.from_numpy(dequantized).T
    assert got.dtype == x.dtype
    # bfloat16 operands and output: ~3 significant digits of each product sum
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0.02)


def _load(path, quantization):
    config = EngineConfig(model=str(path), dtype="float32", quantization=quantization)
    model = load_model(config, load_hf_config(config))
    process_weights_after_loading(model)
    return model


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if t.dtype != torch.float32 or t.dim() > 1)


@pytest.mark.parametrize(("fixture", "type_name"), [("tiny_llama_dir", "Q4_1"), ("tiny_qwen2_dir", "Q8_0"),
                                                     ("tiny_llama_dir", "Q4_0")])
def test_packed_tiny_gguf_gives_the_dequantized_models_tokens(fixture, type_name, prompts, request, tmp_path):
    """Teacher-forced: the packed model's top-1 equals the float32 (dequantized) load's at >= 99% of the positions
    where the reference's top two logits are apart by more than the bfloat16 matmul's error."""
    path = save_tiny_gguf(request.getfixturevalue(fixture), tmp_path / "model.gguf", qtype=type_name)
    packed, expanded = _load(path, "gguf"), _load(path, None)
    linears = [m for m in packed.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.quant_method, GGUFCPUMethod) for m in linears)
    assert any(isinstance(m, PackedEmbedding) for m in packed.modules())
    assert any(isinstance(m, PackedLMHead) for m in packed.modules())
    assert _weight_bytes(packed) < _weight_bytes(expanded) / (2 if type_name == "Q8_0" else 3)
    agree = resolvable = 0
    for got, want in zip(forward_no_cache(packed, prompts), forward_no_cache(expanded, prompts), strict=True):
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.02 * want.abs().amax(-1)
        agree += (got.argmax(-1) == want.argmax(-1))[clear].sum().item()
        resolvable += clear.sum().item()
    assert resolvable >= 10  # the comparison has positions to judge
    assert agree / resolvable >= 0.99


def test_types_without_a_packed_path_stay_dequantized(tiny_llama_dir, tmp_path):
    path = save_tiny_gguf(tiny_llama_dir, tmp_path / "model.gguf", quantize=False)  # F32 weights
    model = _load(path, "gguf")
    assert not any(isinstance(m, PackedEmbedding | PackedLMHead) for m in model.modules())
    assert not any(isinstance(m.quant_method, GGUFCPUMethod) for m in model.modules() if isinstance(m, Linear))


@pytest.mark.slow
def test_smollm2_packed_and_dequantized_give_the_same_greedy_chat_tokens(smollm2_gguf_path):
    messages = [{"role": "user", "content": "What is the capital of France?"}]  # the quick start's (README)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    packed = LLM(str(smollm2_gguf_path), dtype="float32", device="cpu", max_model_len=256)
    assert packed.config.quantization == "gguf"  # what the planner picks for a GGUF file
    (packed_output,) = packed.chat([messages], params, use_tqdm=False)
    expanded = LLM.from_config(dataclasses.replace(packed.config, quantization=None))  # dequantized at load
    (expanded_output,) = expanded.chat([messages], params, use_tqdm=False)
    assert len(packed_output.outputs[0].token_ids) == 30
    assert packed_output.outputs[0].token_ids == expanded_output.outputs[0].token_ids
