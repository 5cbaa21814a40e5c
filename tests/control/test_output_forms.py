"""kubectl habits of the read commands: -o json|yaml|wide (golden text, JSON shapes), --help that teaches, and
shell completion that really completes in bash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from pydantic import ConfigDict, TypeAdapter
from typing_extensions import TypedDict

from tests.control.conftest import RECIPES, REPO
from tests.fixtures.golden import assert_golden

SEED_T4 = RECIPES / "deepseek-qwen-7b-2xt4.yaml"


class DecisionJson(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    field: str
    value: object
    reason: str


class PlanJson(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    name: str
    profile: str
    gpu_count: int
    replicas: int
    backend: str
    engine: dict
    env: dict[str, str]
    memory: dict[str, int | float] | None
    decisions: list[DecisionJson]
    diagnostics: list[dict]
    health: dict
    rollout: dict


class ProfileJson(TypedDict):
    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]  # profiles may grow fields
    name: str
    description: str
    memory_gib: float
    gpu_count: int
    bf16: bool
    cuda_graphs: bool


@pytest.mark.parametrize("command", ["plan", "explain"])
def test_plan_and_explain_json_and_yaml(cli, command):
    as_json = cli(command, SEED_T4, "-o", "json").json()
    TypeAdapter(PlanJson).validate_python(as_json)
    assert as_json["engine"]["max_model_len"] == 16384 and as_json["memory"]["kv_tokens"] == 139008
    assert any(d["field"] == "dtype" and "bfloat16" in d["reason"] for d in as_json["decisions"])
    assert yaml.safe_load(cli(command, SEED_T4, "-o", "yaml").out) == as_json
    assert cli(command, SEED_T4, "--format", "json").json() == as_json  # the old spelling still works


def test_plan_and_explain_wide(cli):
    assert_golden("plan-seed-t4-wide.txt", cli("plan", SEED_T4, "-o", "wide").out)
    out = cli("explain", SEED_T4, "-o", "wide").out
    assert_golden("explain-seed-t4-wide.txt", out.replace(str(RECIPES), "recipes"))


def test_profiles_forms(cli):
    profiles = cli("profiles", "list", "-o", "json").json()
    TypeAdapter(list[ProfileJson]).validate_python(profiles, strict=True)
    assert {"t4", "h100-80gb", "cpu"} <= {p["name"] for p in profiles}
    assert yaml.safe_load(cli("profiles", "list", "-o", "yaml").out) == profiles
    assert_golden("profiles-list.txt", cli("profiles", "list").out)
    assert_golden("profiles-list-wide.txt", cli("profiles", "list", "-o", "wide").out)
    t4 = cli("profiles", "show", "t4", "-o", "json").json()
    assert t4 == yaml.safe_load(cli("profiles", "show", "t4").out) and t4["compute_capability"] == 7.5
    detected = cli("profiles", "detect", "-o", "json").json()
    assert set(detected) == {"profile", "count", "method", "gpu_name", "memory_gib", "compute_capability"}


def _help(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "vdeploy.cli", *args, "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_teaches_by_example_and_names_the_environment():
    top = _help()
    assert "examples:" in top and "environment:" in top
    for variable in ("VDEPLOY_STATE_DIR", "HF_HOME", "HF_ENDPOINT", "VDEPLOY_PROFILE_PATH", "NO_COLOR"):
        assert variable in top
    for command in ("plan", "status", "rollout", "profiles", "completion"):
        assert "examples:" in _help(command), command


def _complete(script: str, words: list[str], state_dir: str) -> list[str]:
    program = (f"{script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
               "_vdeploy; printf '%s\\n' \"${COMPREPLY[@]}\"")
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "VDEPLOY_STATE_DIR": state_dir})
    assert result.returncode == 0, result.stderr
    return [w for w in result.stdout.splitlines() if w]


def test_bash_completion_completes(cli, tmp_path):
    script = cli("completion", "bash").out
    (tmp_path / "quickstart").mkdir()
    (tmp_path / "other").mkdir()
    state = str(tmp_path)
    assert _complete(script, ["vdeploy", "pl"], state) == ["plan"]
    assert _complete(script, ["vdeploy", "rollout", ""], state) == ["status", "history", "undo"]
    assert sorted(_complete(script, ["vdeploy", "rollout", "status", ""], state)) == ["other", "quickstart"]
    assert _complete(script, ["vdeploy", "status", "-o", ""], state) == ["text", "json", "yaml", "wide"]
    assert _complete(script, ["vdeploy", "plan", "--sw"], state) == ["--sweep"]
    assert _complete(script, ["vdeploy", "completion", ""], state) == ["bash", "zsh", "fish"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_scripts(cli, shell):
    script = cli("completion", shell).out
    assert "rollout" in script and "--sweep" in script.replace("-l sweep", "--sweep")
    if shutil.which(shell):  # the shell parses what we generate
        check = subprocess.run([shell, "-n" if shell == "zsh" else "--no-execute"], input=script, text=True,
                               capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr
