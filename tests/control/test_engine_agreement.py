"""The plan never promises what the built-in engine cannot do: every EngineConfig field is read by the engine, or
`vdeploy lint` refuses the values the engine cannot run (VD210, one test each)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import vdeploy_engine
from vdeploy_engine.config import EngineConfig

ENGINE = Path(vdeploy_engine.__file__).parent

# EngineConfig field -> a recipe asking for a value of it the built-in engine cannot run, and the field lint names.
REFUSED = {
    "pipeline_parallel_size": ("runner: pooling\nconvert: embed\nparallelism: {pipeline_parallel_size: 2}",
                               "parallelism.pipeline_parallel_size"),
    "cpu_offload_gb": ("memory: {cpu_offload_gb: 2}", "memory.cpu_offload_gb"),
    "kv_cache_dtype": ("memory: {kv_cache_dtype: fp8}", "memory.kv_cache_dtype"),
}


def _config_fields_read_by_the_engine() -> set[str]:
    """Names read as `config.X`, `cfg.X` or `<...>.config.X` in the engine's modules, with the fields that the
    EngineConfig properties they read (`name`) stand for."""
    read = set()
    for file in ENGINE.rglob("*.py"):
        if file == ENGINE / "config.py":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                owner = node.value
                if (isinstance(owner, ast.Name) and owner.id in ("config", "cfg")) or (
                    isinstance(owner, ast.Attribute) and owner.attr == "config"
                ):
                    read.add(node.attr)
    config_class = next(
        node for node in ast.walk(ast.parse((ENGINE / "config.py").read_text()))
        if isinstance(node, ast.ClassDef) and node.name == "EngineConfig"
    )
    for method in config_class.body:
        if isinstance(method, ast.FunctionDef) and method.name in read:
            read |= {n.attr for n in ast.walk(method) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                     and n.value.id == "self"}
    return read


def test_every_field_is_honoured_by_the_engine_or_refused_by_lint():
    read = _config_fields_read_by_the_engine()
    ignored = [f.name for f in dataclasses.fields(EngineConfig) if f.name not in read and f.name not in REFUSED]
    assert not ignored, f"EngineConfig fields the built-in engine ignores and lint does not refuse: {ignored}"


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_lint_refuses_what_the_builtin_engine_cannot_run(cli, write_recipe, field):
    text, where = REFUSED[field]
    text = "model: facebook/opt-125m\n" + text
    refused = cli("lint", "--format", "json", write_recipe(text + "\nhardware: {profile: l4, count: 2}\n"))
    assert refused.code == 1
    [diagnostic] = [d for d in refused.json() if d["code"] == "VD210"]
    assert "builtin" in diagnostic["message"] and "backend: vllm" in diagnostic["hint"]
    assert diagnostic["line"] == next(i for i, line in enumerate(text.splitlines(), 1) if where.split(".")[-1] in line)
    vllm = cli("lint", "--format", "json", write_recipe(text + "\nhardware: {profile: l4, count: 2}\nbackend: vllm\n"))
    assert "VD210" not in [d["code"] for d in vllm.json()]


@pytest.mark.parametrize(
    ("model", "stages", "refused"),
    [
        ("google/gemma-3-270m-it", 2, "cannot split Gemma3ForCausalLM into pipeline stages"),
        ("facebook/opt-125m", 16, "pipeline_parallel_size 16 is more than the model's 12 layers"),
        ("facebook/opt-125m", 2, None),
    ],
    ids=["architecture-not-split", "more-stages-than-layers", "opt-splits"],
)
def test_lint_refuses_the_pipelines_the_builtin_engine_cannot_run(cli, write_recipe, model, stages, refused):
    text = f"model: {model}\nparallelism: {{pipeline_parallel_size: {stages}}}\nhardware: {{profile: cpu}}\n"
    diagnostics = cli("lint", "--format", "json", write_recipe(text)).json()
    vd210 = [d for d in diagnostics if d["code"] == "VD210"]
    if refused is None:
        assert not vd210
        return
    [diagnostic] = vd210
    assert refused in diagnostic["message"] and diagnostic["line"] == 2


def test_lint_refuses_cuda_graphs_across_pipeline_stages(cli, write_recipe):
    text = ("model: facebook/opt-125m\nparallelism: {pipeline_parallel_size: 2}\nruntime: {enforce_eager: false}\n"
            "hardware: {profile: l4, count: 2}\n")
    [diagnostic] = [d for d in cli("lint", "--format", "json", write_recipe(text)).json() if d["code"] == "VD210"]
    assert "CUDA graphs" in diagnostic["message"] and diagnostic["line"] == 3
    plan = cli("plan", "--format", "json", write_recipe(text.replace("enforce_eager: false", "seed: 0"))).json()
    assert plan["engine"]["enforce_eager"] is True and plan["memory"]["cuda_graph_bytes"] == 0
