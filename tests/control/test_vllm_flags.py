"""vdeploy/vllm_flags.py: every `vllm serve` flag is a setting, one of serve's own, or refused / ignored by name with
a reason; --config reads vLLM's YAML of flags; VLLM_API_KEY is read as vLLM reads it."""

from __future__ import annotations

import argparse

import pytest

from vdeploy.cli import build_parser
from vdeploy.commands.serve import engine_arguments, vllm_flag_problems, with_config_file
from vdeploy.settings import SETTINGS
from vdeploy.vllm_flags import FLAGS


def _parse(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "some/model", *flags])


def _given(flag) -> list[str]:
    name = flag.short or flag.flag
    if flag.arity == "value":
        return [name, "some-value"]
    return [name]


def test_no_flag_is_declared_twice():
    setting_flags = {s.flag for s in SETTINGS if s.flag} | {s.short for s in SETTINGS if s.short}
    table_flags = [f.flag for f in FLAGS] + [f.short for f in FLAGS if f.short]
    assert len(table_flags) == len(set(table_flags))
    assert not setting_flags & set(table_flags)
    assert all(f.why for f in FLAGS)


@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f.flag)
def test_every_table_flag_parses_and_is_refused_or_ignored_by_name(flag):
    args = _parse(*_given(flag))
    errors, warnings = vllm_flag_problems(args)
    if flag.status == "refused":
        assert len(errors) == 1 and flag.flag in errors[0] and flag.why in errors[0] and not warnings
    else:
        assert len(warnings) == 1 and flag.flag in warnings[0] and flag.why in warnings[0] and not errors
    assert engine_arguments(args) == {}  # nothing of it reaches the compiler


@pytest.mark.parametrize("flag", [f for f in FLAGS if f.accepts], ids=lambda f: f.flag)
def test_values_the_engine_honours_pass(flag):
    assert vllm_flag_problems(_parse(flag.flag, flag.accepts[0])) == ([], [])


def test_the_issues_vllm_command_line_is_understood():
    args = _parse(
        "--revision", "main", "--tokenizer", "tok", "--kv-cache-dtype", "auto", "--data-parallel-size", "1",
        "--generation-config", "vllm", "--disable-log-requests", "--enable-auto-tool-choice", "--tool-call-parser",
        "hermes",
    )  # fmt: skip
    errors, warnings = vllm_flag_problems(args)
    assert errors == [] and len(warnings) == 1
    assert engine_arguments(args) == {
        "revision": "main", "tokenizer": "tok", "kv_cache_dtype": "auto", "enable_auto_tool_choice": True,
        "tool_call_parser": "hermes",
    }  # fmt: skip


def test_serve_refuses_a_refused_flag_before_planning(capsys):
    args = _parse("--enable-lora", "--max-model-len", "64")
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "--enable-lora is not supported by the built-in engine: LoRA adapters" in err


def test_config_file_fills_what_the_command_line_leaves(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "model: ignored/for/the/positional\nmax_model_len: 256\nmax-num-seqs: 8\nenable_prefix_caching: false\n"
        "enforce_eager: false\nenable-lora: true\n"
    )
    args = with_config_file(_parse("--config", str(config), "--max-model-len", "512"))
    assert args.model == "some/model"
    assert engine_arguments(args) == {"max_model_len": 512, "max_num_seqs": 8, "enable_prefix_caching": False}
    assert "--enable-lora" in vllm_flag_problems(args)[0][0]


@pytest.mark.parametrize(
    ("text", "message"),
    [("max_model_lenn: 4\n", "not a vllm serve flag: --max-model-lenn"), ("- a\n", "mapping"), ("a: [\n", "YAML")],
)
def test_a_bad_config_file_names_itself_and_the_problem(tmp_path, text, message):
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        with_config_file(_parse("--config", str(config)))
    assert str(config) in str(caught.value)


def test_vllm_api_key_is_the_default_key(monkeypatch):
    from vdeploy_engine.config import EngineConfig
    from vdeploy_engine.server.launch import api_key_from_env

    monkeypatch.setenv("VLLM_API_KEY", "k-123")
    assert api_key_from_env(EngineConfig(model="m")) == "k-123"
    monkeypatch.setenv("MY_KEY", "mine")
    assert api_key_from_env(EngineConfig(model="m", api_key_env="MY_KEY")) == "mine"
    monkeypatch.delenv("VLLM_API_KEY")
    assert api_key_from_env(EngineConfig(model="m")) is None
