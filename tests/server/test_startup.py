"""Start-up failures end with one clear line and a non-zero exit; `vdeploy serve` refuses bad flags before loading."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.server.conftest import REPO, write_config


def _run(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_unreadable_config(tmp_path):
    result = _run("-m", "vdeploy_engine.server", "--config", str(tmp_path / "missing.json"))
    assert result.returncode == 1
    assert (
        _last_line(result)
        == f"EngineStartupError: cannot read --config {tmp_path / 'missing.json'}: No such file or directory"
    )


def test_malformed_config_names_line_and_column(tmp_path):
    config = tmp_path / "plan.json"
    config.write_text('{\n  "model": "x",\n  oops\n}')
    result = _run("-m", "vdeploy_engine.server", "--config", str(config))
    assert result.returncode == 1
    assert _last_line(result).startswith(f"EngineStartupError: {config}:3:3: not valid JSON")
    assert "Traceback" not in result.stderr


def test_invalid_field_is_named(tmp_path):
    config = write_config(tmp_path / "plan.json", model="x", max_num_seqs=0)
    result = _run("-m", "vdeploy_engine.server", "--config", str(config))
    assert result.returncode == 1
    assert "max_num_seqs: must be >= 1" in _last_line(result)
    unknown = write_config(tmp_path / "plan2.json", model="x", max_num_seq=3)
    assert "max_num_seq: unknown EngineConfig field" in _last_line(
        _run("-m", "vdeploy_engine.server", "--config", str(unknown))
    )


def test_unset_api_key_env(tmp_path):
    config = write_config(tmp_path / "plan.json", model="x", api_key_env="VDEPLOY_TEST_UNSET_KEY")
    result = _run("-m", "vdeploy_engine.server", "--config", str(config))
    assert result.returncode == 1
    assert "VDEPLOY_TEST_UNSET_KEY" in _last_line(result)


def test_model_that_cannot_load_says_why(tmp_path):
    config = write_config(tmp_path / "plan.json", model=str(tmp_path / "no-such-model"), kv_cache_memory_bytes=1 << 20)
    result = _run("-m", "vdeploy_engine.server", "--config", str(config), "--port", "0")
    assert result.returncode == 1
    last = _last_line(result)
    assert last.startswith("EngineStartupError: ") and "no-such-model" in last
    assert "Traceback" not in result.stderr


def test_serve_refuses_bfloat16_on_a_t4_before_loading(smollm2_gguf_path):
    # -X importtime lists every module imported: the refusal must come before torch is.
    result = _run(
        "-X", "importtime", "-m", "vdeploy.cli", "serve", str(smollm2_gguf_path), "--dtype=bfloat16", "--hardware", "t4"
    )
    assert result.returncode == 1
    assert "VD103" in result.stderr and "bfloat16" in result.stderr
    imported = set(re.findall(r"^import time:.*\|\s+([\w.]+)$", result.stderr, re.M))
    assert "vdeploy.compiler" in imported  # the check did run
    assert not imported & {"torch", "transformers", "triton"}


def test_serve_task_flag_gives_the_migration_error(smollm2_gguf_path):
    result = _run("-m", "vdeploy.cli", "serve", str(smollm2_gguf_path), "--task", "embed")
    assert result.returncode == 1
    assert "task" in result.stderr and "runner: pooling" in result.stderr


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-model-len", "512", "-tp", "2", "--enforce-eager", "--served-model-name", "m"],
        ["--max-model-len=512", "--tensor-parallel-size=2", "--enforce-eager", "--served-model-name=m"],
    ],
)
def test_serve_flag_forms(flags):
    from vdeploy.cli import build_parser

    args = build_parser().parse_args(["serve", "some/model", *flags])
    assert (args.max_model_len, args.tensor_parallel_size, args.enforce_eager, args.served_model_name) == (
        512,
        2,
        True,
        "m",
    )
