"""GGUF loading: tiny GGUF files written from the tiny HF fixtures (F32 against the HF original, Q8_0 against
transformers reading the same file), the real SmolLM2-135M Q4_1 file against transformers, and the errors."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.fixtures.tiny_models import save_tiny_gguf, save_tiny_model
from tests.models.harness import forward_no_cache, load_engine_model, reference_logits
from vdeploy_engine.config import EngineConfig
from vdeploy_engine.loader import ModelLoadError, load_hf_config, load_model, load_tokenizer
from vdeploy_engine.loader.gguf import _unpermute_rope_rows, hf_tensor_name

PROMPTS = ["The capital of France is", "请用一句话介绍一下北京。"]


TINY = ["tiny_llama_dir", "tiny_qwen2_dir"]  # llama: q/k rows permuted by llama.cpp; qwen2: not, and q/k/v biases


@pytest.mark.parametrize("fixture", TINY)
def test_float32_gguf_gives_the_hf_checkpoint_logits(fixture, prompts, request, tmp_path):
    """Independent of transformers' GGUF code: same numbers as the HF checkpoint the file was written from."""
    hf_dir = request.getfixturevalue(fixture)
    path = save_tiny_gguf(hf_dir, tmp_path / "model.gguf", quantize=False)
    got = forward_no_cache(load_engine_model(path), prompts)
    for row, want in zip(got, forward_no_cache(load_engine_model(hf_dir), prompts), strict=True):
        torch.testing.assert_close(row, want, atol=1e-5, rtol=0)


def test_llama3_rope_factors_stored_by_llama_cpp_are_applied(tmp_path):
    """llama.cpp keeps llama 3 rope scaling as a rope_freqs.weight tensor of per-frequency divisors."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,  # a 16-dim head's wavelengths fall in all three llama3 bands
    }
    hf_dir = save_tiny_model(tmp_path / "hf", "llama", rope_parameters=rope)
    path = save_tiny_gguf(hf_dir, tmp_path / "model.gguf", quantize=False)
    assert load_hf_config(EngineConfig(model=str(path))).rope_freq_factors[-1] == 8.0
    sequences = [list(range(3, 40))]
    got = forward_no_cache(load_engine_model(path), sequences)[0]
    torch.testing.assert_close(got, reference_logits(hf_dir, sequences)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("fixture", TINY)
def test_q8_gguf_matches_transformers_reading_the_same_file(fixture, prompts, request, tmp_path):
    path = save_tiny_gguf(request.getfixturevalue(fixture), tmp_path / "model.gguf")
    got = forward_no_cache(load_engine_model(path), prompts)
    want = reference_logits(tmp_path, prompts, gguf_file=path.name)
    for row, ref in zip(got, want, strict=True):
        torch.testing.assert_close(row, ref, atol=1e-4, rtol=0)


def test_tiny_gguf_tokenizer_matches_the_original(tiny_llama_dir, tmp_path):
    path = save_tiny_gguf(tiny_llama_dir, tmp_path / "model.gguf")
    ours = load_tokenizer(EngineConfig(model=str(path)))
    original = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = "你好，世界! The quick brown fox."
    assert ours(text).input_ids == original(text).input_ids
    assert ours.eos_token == "<|im_end|>"
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_tokenizer_is_converted_once_then_read_from_the_cache(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VDEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    path = save_tiny_gguf(tiny_llama_dir, tmp_path / "model.gguf")
    config = EngineConfig(model=str(path))
    first = load_tokenizer(config)
    (entry,) = (tmp_path / "cache" / "gguf-tokenizers").iterdir()
    # Later loads read the entry: a template edited there shows up.
    (entry / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    second = load_tokenizer(config)
    assert second.apply_chat_template([{"role": "user", "content": "cached"}], tokenize=False) == "cached"
    assert second("你好 world").input_ids == first("你好 world").input_ids
    # A damaged entry is rebuilt from the file.
    (entry / "tokenizer.json").write_text("{not json")
    rebuilt = load_tokenizer(config)
    assert rebuilt("你好 world").input_ids == first("你好 world").input_ids
    assert rebuilt.chat_template == first.chat_template


def test_truncated_gguf_is_reported(tiny_llama_dir, tmp_path):
    path = save_tiny_gguf(tiny_llama_dir, tmp_path / "model.gguf")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(ModelLoadError, match="model.gguf: not a readable GGUF file"):
        load_engine_model(path)


def test_gguf_of_an_unsupported_architecture_names_it(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ModelLoadError, match=r"falcon.gguf: GGUF architecture 'falcon' is not supported \(supported: gemma3, llama"
    ):
        load_hf_config(EngineConfig(model=str(tmp_path / "falcon.gguf")))


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    config = EngineConfig(model=str(smollm2_gguf_path), dtype="float32")
    hf_config = load_hf_config(config)
    return config, hf_config, load_model(config, hf_config), load_tokenizer(config)


@pytest.mark.slow  # the smollm2 fixture loads the real model and its GGUF tokenizer (~30 s)
def test_gguf_metadata_becomes_a_llama_config(smollm2):
    _, hf_config, _, _ = smollm2
    assert hf_config.architectures == ["LlamaForCausalLM"]
    assert (hf_config.num_hidden_layers, hf_config.hidden_size, hf_config.intermediate_size) == (30, 576, 1536)
    assert (hf_config.num_attention_heads, hf_config.num_key_value_heads, hf_config.head_dim) == (9, 3, 64)
    assert hf_config.vocab_size == 49152 and hf_config.tie_word_embeddings
    assert hf_config.rope_parameters["rope_theta"] == 100000.0


@pytest.mark.slow
def test_gguf_tokenizer_and_chat_template_come_from_the_file(smollm2):
    _, _, _, tokenizer = smollm2
    assert tokenizer.decode(tokenizer(PROMPTS[1]).input_ids) == PROMPTS[1]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
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
