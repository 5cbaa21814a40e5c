"""The real Gemma-3-270M Q4_K_M GGUF against transformers reading the same file: the config built from the metadata,
teacher-forced top-1 agreement over a prompt longer than the 512-token window, and greedy tokens through the engine.

transformers takes ~50 s to load the file on two cores: one reference per module, its outputs computed once."""

from __future__ import annotations

import os

import pytest
import torch

from tests.models.harness import forward_no_cache, load_engine_model
from vdeploy_engine import LLM, SamplingParams

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "Write a haiku about the sea.\n", "def fibonacci(n):"]
MAX_TOKENS = 30


@pytest.fixture(scope="module")
def llm(gemma3_gguf_path):
    # hardware auto: the plan budgets from this machine's RAM (float32 weights and the packed tied head take 1.7 GB).
    return LLM(str(gemma3_gguf_path), dtype="float32", max_model_len=1024, device="cpu", hardware="auto")


@pytest.fixture(scope="module")
def long_prompt(llm) -> list[int]:
    """~700 tokens: the sliding layers see only the last 512 of them, the global layers all."""
    text = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 13} stones." for i in range(50))
    ids = llm.get_tokenizer()(text).input_ids
    assert len(ids) > 600
    return ids


@pytest.fixture(scope="module")
def reference(gemma3_gguf_path, llm, long_prompt):
    """transformers' greedy continuations of PROMPTS and its logits over the long prompt."""
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("USE_HUB_KERNELS", "0")
    model = AutoModelForCausalLM.from_pretrained(
        gemma3_gguf_path.parent, gguf_file=gemma3_gguf_path.name, dtype=torch.float32
    ).eval()
    tokenizer = llm.get_tokenizer()
    greedy = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt).input_ids])
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS)
            greedy[prompt] = out[0, ids.shape[1] :].tolist()
        logits = model(torch.tensor([long_prompt])).logits[0]
    return greedy, logits


def test_gguf_metadata_becomes_a_gemma3_config(llm):
    from vdeploy_engine.loader import load_hf_config

    config = load_hf_config(llm.config)
    assert config.architectures == ["Gemma3ForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (18, 640, 2048)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.sliding_window == 512 and config.vocab_size == 262144
    assert config.layer_types.count("full_attention") == 3 and config.layer_types[5] == "full_attention"
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 1e4


def test_teacher_forced_top1_agrees_past_the_sliding_window(gemma3_gguf_path, long_prompt, reference):
    ours = forward_no_cache(load_engine_model(gemma3_gguf_path), [long_prompt])[0]
    agreement = (ours.argmax(-1) == reference[1].argmax(-1)).float().mean().item()
    assert agreement >= 0.99, agreement
    assert (ours[-100:] - reference[1][-100:]).abs().max() < 1e-2  # past the window too


def test_greedy_tokens_match_transformers(llm, reference):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.outputs[0].token_ids == reference[0][prompt], prompt
