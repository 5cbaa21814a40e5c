"""Recipe loading: the schema's nesting, YAML positions, several documents per file, the JSON Schema."""

from __future__ import annotations

import json

from tests.control.conftest import REPO
from vdeploy.recipe import HardwareSpec, derive_name, json_schema, parse_recipes


def test_design_example_parses_with_its_nesting():
    text = """
name: deepseek-qwen-7b
model: /models/deepseek-Qwen2.5-7B
served_model_name: "Qwen2.5:0.5B"
hardware: {profile: t4, count: 2}
parallelism: {tensor_parallel_size: 2}
memory: {max_model_len: 16384, max_num_seqs: 2, gpu_memory_utilization: 0.8, swap_space: 1}
runtime: {enforce_eager: true}
server: {port: 8000}
"""
    [doc] = parse_recipes(text)
    r = doc.recipe
    assert not doc.diagnostics
    assert r.hardware == HardwareSpec(profile="t4", count=2) and (r.hardware_profile, r.gpu_count) == ("t4", 2)
    assert (r.memory.max_model_len, r.memory.max_num_seqs, r.memory.gpu_memory_utilization) == (16384, 2, 0.8)
    assert r.memory.max_num_batched_tokens == "auto" and r.runtime.enforce_eager is True
    assert r.served_model_name == "Qwen2.5:0.5B"


def test_positions_of_nested_keys():
    [doc] = parse_recipes("model: x\nmemory:\n  max_model_len: 10\nenv:\n  - A\n", "f.yaml")
    assert doc.source.locate(("memory", "max_model_len")) == (3, 3)
    assert doc.source.locate(("memory", "not_there")) == (2, 1)  # falls back to the parent
    assert doc.source.locate(("env", 0)) == (5, 5)


def test_several_documents_keep_their_own_lines():
    text = "name: a\nmodel: x\n---\nname: b\nmodel: y\nmemory: {max_num_seqs: none}\n"
    first, second = parse_recipes(text, "two.yaml")
    assert first.recipe.name == "a" and second.recipe is None
    [d] = second.diagnostics
    assert (d.code, d.line, d.column) == ("VD005", 6, 10)


def test_merge_keys_and_anchors():
    [doc] = parse_recipes("model: x\nserver: {host: &h 0.0.0.0}\nmemory: {<<: {max_num_seqs: 4}, block_size: 32}\n")
    assert doc.recipe.memory.max_num_seqs == 4 and doc.recipe.memory.block_size == 32
    assert doc.recipe.server.host == "0.0.0.0"
    # An anchor belongs to its own document: using it in the next one is a YAML error, located at the alias.
    _, second = parse_recipes("name: a\nmodel: &m x\n---\nname: b\nmodel: *m\n")
    [d] = second.diagnostics
    assert (d.code, d.line, d.column) == ("VD001", 5, 8)


def test_hardware_forms():
    texts = ["model: x\nhardware: t4\n", "model: x\nhardware: {profile: t4, count: 2}\n", "model: x\n"]
    assert [parse_recipes(t)[0].recipe.hardware_profile for t in texts] == ["t4", "t4", "auto"]


def test_api_key_env_must_be_a_variable_name():
    [doc] = parse_recipes("model: x\nserver: {api_key_env: 'sk-live-123'}\n")
    assert doc.diagnostics[0].code == "VD005" and "VDEPLOY_API_KEY" in doc.diagnostics[0].hint


def test_name_defaults_from_the_model():
    [doc] = parse_recipes("model: Qwen/Qwen2.5-7B-Instruct\n")
    assert doc.recipe.deployment_name == "qwen2-5-7b-instruct"
    assert derive_name("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct-q4-1"


def test_derived_names_clash_too():
    first, second = parse_recipes("model: facebook/opt-125m\n---\nmodel: facebook/opt-125m\n")
    assert [d.code for d in second.diagnostics] == ["VD008"]


def test_schema_forbids_unknown_keys_everywhere():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert all(section.get("additionalProperties") is False for section in schema["$defs"].values()
               if section.get("type") == "object" and "properties" in section)
    assert "task" not in schema["properties"] and "api_key" not in schema["$defs"]["Server"]["properties"]


def test_committed_schema_is_current(cli):
    """recipes/*.yaml point yaml-language-server at vdeploy/data/recipe.schema.json; it must match `vdeploy schema`."""
    result = cli("schema")
    assert result.code == 0
    assert json.loads(result.out) == json.loads((REPO / "vdeploy/data/recipe.schema.json").read_text())
