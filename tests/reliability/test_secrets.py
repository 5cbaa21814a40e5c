"""Secrets in a recipe's `env`: lint warns on a literal one, `${NAME}` takes it from the environment, and no
renderer writes a secret value into its text (systemd EnvironmentFile, Kubernetes Secret, shell reference)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.apply.conftest import make_plan
from tests.apply.test_render import _k8s_objects
from vdeploy.backends import replica_env
from vdeploy.render import render
from vdeploy.secrets import EnvReferenceError, is_secret, literal_secrets

TOKEN = "hf_SuperSecret0123456789"


def test_what_looks_like_a_secret() -> None:
    assert all(is_secret(n, "x") for n in ("HF_TOKEN", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD"))
    assert is_secret("HELPER", "sk-abcdefghijklmnop")  # a well-known token prefix, whatever the name
    assert not any(is_secret(n, "1") for n in ("CUDA_VISIBLE_DEVICES", "CC", "KEYBOARD_LAYOUT", "OMP_NUM_THREADS"))
    assert literal_secrets({"HF_TOKEN": "${HF_TOKEN}", "DB_PASSWORD": "hunter2", "CC": "gcc"}) == ["DB_PASSWORD"]


def test_lint_warns_on_a_literal_secret_and_suggests_the_reference(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: facebook/opt-125m\nhardware: t4\nenv:\n  CC: gcc\n  HF_TOKEN: {TOKEN}\n")
    result = subprocess.run(
        [sys.executable, "-m", "vdeploy.cli", "lint", "--format", "json", str(recipe)], capture_output=True, text=True
    )
    found = [d for d in json.loads(result.stdout) if d["code"] == "VD012"]
    assert result.returncode == 0 and len(found) == 1  # a warning: the recipe still applies
    assert found[0]["line"] == 5 and found[0]["severity"] == "warning"
    assert '"${HF_TOKEN}"' in found[0]["hint"] and TOKEN not in result.stdout
    recipe.write_text('model: facebook/opt-125m\nhardware: t4\nenv:\n  HF_TOKEN: "${HF_TOKEN}"\n')
    again = subprocess.run(
        [sys.executable, "-m", "vdeploy.cli", "lint", "--format", "json", str(recipe)], capture_output=True, text=True
    )
    assert "VD012" not in again.stdout


@pytest.fixture
def plan() -> dict:
    return make_plan(env={"CC": "/usr/bin/gcc-12", "HF_TOKEN": TOKEN, "DB_PASSWORD": "${DB_PASSWORD}"})


def test_systemd_unit_takes_secrets_from_an_environment_file(tmp_path, plan) -> None:
    unit = render(plan, "systemd", recipe_path=str(tmp_path / "r.yaml"))
    assert TOKEN not in unit and "DB_PASSWORD=" not in unit
    assert 'Environment="CC=/usr/bin/gcc-12"' in unit
    assert "EnvironmentFile=-/etc/vdeploy/demo.env" in unit and "DB_PASSWORD, HF_TOKEN" in unit


def test_k8s_puts_secrets_in_a_secret_not_the_configmap_or_the_pod(plan) -> None:
    text = render(plan, "k8s")
    secret, config_map, deployment, _ = _k8s_objects(text)
    assert secret.kind == "Secret" and secret.string_data == {"HF_TOKEN": TOKEN}  # only the literal one
    assert TOKEN not in config_map.data["plan.json"] and "DB_PASSWORD" not in config_map.data["plan.json"]
    env = {e.name: e for e in deployment.spec.template.spec.containers[0].env}
    assert env["CC"].value == "/usr/bin/gcc-12"
    for name in ("HF_TOKEN", "DB_PASSWORD"):
        assert env[name].value is None and env[name].value_from.secret_key_ref.to_dict() == {
            "name": "demo-env",
            "key": name,
            "optional": None,
        }
    assert text.count(TOKEN) == 1 and yaml.safe_load_all(text)


def test_command_line_refers_to_the_shells_variables(plan) -> None:
    line = render(plan, "builtin")
    assert TOKEN not in line and 'HF_TOKEN="${HF_TOKEN}"' in line and "CC=/usr/bin/gcc-12" in line


def test_replica_env_resolves_references_and_names_an_unset_one(plan, monkeypatch) -> None:
    monkeypatch.setenv("DB_PASSWORD", "from-the-environment")
    env = replica_env(plan, None)
    assert env["DB_PASSWORD"] == "from-the-environment" and env["HF_TOKEN"] == TOKEN
    monkeypatch.delenv("DB_PASSWORD")
    with pytest.raises(EnvReferenceError, match=r"env DB_PASSWORD refers to \$\{DB_PASSWORD\}, which is not set"):
        replica_env(plan, None)
