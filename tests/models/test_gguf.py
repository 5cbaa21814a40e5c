"""GGUF loading: the real SmolLM2-135M Q4_1 file against transformers loading the same file, and the metadata and
tensor-name mapping on their own."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine.config import EngineConfig
from engine.loader import load_hf_config, load_model, load_tokenizer
from engine.loader.gguf import _unpermute_rope_rows, hf_tensor_name
from tests.models.harness import forward_no_cache

PROMPTS = ["The capital of France is", "请用一句话介绍一下北京。"]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    config = EngineConfig(model=str(smollm2_gguf_path), dtype="float32")
    hf_config = load_hf_config(config)
    return config, hf_config, load_model(config, hf_config), load_tokenizer(config)


def test_gguf_metadata_becomes_a_llama_config(smollm2):
    _, hf_config, _, _ = smollm2
    assert hf_config.architectures == ["LlamaForCausalLM"]
    assert (hf_config.num_hidden_layers, hf_config.hidden_size, hf_config.intermediate_size) == (30, 576, 1536)
    assert (hf_config.num_attention_heads, hf_config.num_key_value_heads, hf_config.head_dim) == (9, 3, 64)
    assert hf_config.vocab_size == 49152 and hf_config.tie_word_embeddings
    assert hf_config.rope_parameters["rope_theta"] == 100000.0


def test_gguf_tokenizer_and_chat_template_come_from_the_file(smollm2):
    _, _, _, tokenizer = smollm2
    assert tokenizer.decode(tokenizer(PROMPTS[1]).input_ids) == PROMPTS[1]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers_loading_the_same_file(smollm2, smollm2_gguf_path):
    _, _, model, tokenizer = smollm2
    sequences = [tokenizer(p).input_ids for p in PROMPTS]
    ours = forward_no_cache(model, sequences)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32
    ).eval()
    for ids, got in zip(sequences, ours, strict=True):
        with torch.no_grad():
            want = reference(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_gguf_tensor_names_map_to_hf_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.7.attn_q.bias") == "model.layers.7.self_attn.q_proj.bias"
    assert hf_tensor_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_tensor_name("blk.0.attn_norm.weight") == "model.layers.0.input_layernorm.weight"
    assert hf_tensor_name("rope_freqs.weight") is None


def test_rope_row_permutation_is_undone():
    """llama.cpp's converter stores each head's rows as (half, pair) interleaved; undoing it restores HF's order."""
    heads, head_dim, cols = 2, 8, 3
    hf = torch.arange(heads * head_dim * cols, dtype=torch.float32).reshape(heads * head_dim, cols)
    llama_cpp = hf.reshape(heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(heads * head_dim, cols)
    assert torch.equal(_unpermute_rope_rows(llama_cpp, heads), hf)
