"""The apply-side commands in-process, where no replica needs to start: dry runs, refusals and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.apply.test_render import _k8s_objects
from vdeploy.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
QUICKSTART = RECIPES / "quickstart-smollm2-cpu.yaml"


def _quickstart(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(QUICKSTART.read_text()), **changes}))
    return path


def test_dry_run_reports_a_new_deployment_and_touches_nothing(state_dir: Path, capsys) -> None:
    assert main(["apply", str(QUICKSTART), "--dry-run", "--format", "json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["action"] == "would roll out" and result["changes"] == ["new deployment"]
    assert not state_dir.exists()
    assert main(["plan", str(QUICKSTART), "--detailed-exitcode"]) == 2


def test_vllm_backend_without_vllm_fails_with_that_message(state_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["apply", str(_quickstart(tmp_path, backend="vllm"))]) == 1
    err = capsys.readouterr().err
    assert "vllm is not installed" in err and "Traceback" not in err
    assert not state_dir.exists()  # refused before any state was written


def test_recipe_errors_stop_apply_before_any_state(state_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["apply", str(_quickstart(tmp_path, max_model_len=512))]) == 1  # belongs under `memory:`
    err = capsys.readouterr().err
    assert "recipe.yaml:" in err and "error[VD003]" in err and "nothing changed" in err
    assert not state_dir.exists()
    assert main(["plan", str(tmp_path / "recipe.yaml"), "--detailed-exitcode"]) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "nope"],
        ["logs", "nope"],
        ["delete", "nope"],
        ["rollout", "status", "nope"],
        ["rollout", "undo", "nope"],
    ],
)
def test_unknown_deployment_is_a_clear_error(state_dir: Path, capsys, argv: list[str]) -> None:
    assert main(argv) == 1
    assert "no deployment named 'nope'" in capsys.readouterr().err


def test_status_with_no_deployments(state_dir: Path, capsys) -> None:
    assert main(["status"]) == 0
    assert capsys.readouterr().out.strip() == "no deployments"


def test_render_writes_files_for_each_target(tmp_path: Path, capsys) -> None:
    recipe = RECIPES / "deepseek-qwen-7b-2xt4.yaml"
    out = tmp_path / "out"
    assert main(["render", str(recipe), "--target", "k8s", "-o", str(out)]) == 0
    kinds = [o.kind for o in _k8s_objects((out / "deepseek-qwen-7b.yaml").read_text())]
    assert kinds == ["ConfigMap", "Deployment", "Service"]
    assert main(["render", str(recipe), "--target", "builtin", "-o", str(out)]) == 0
    plan = json.loads((out / "deepseek-qwen-7b.plan.json").read_text())  # the file the command line points at
    assert str(out / "deepseek-qwen-7b.plan.json") in (out / "deepseek-qwen-7b.sh").read_text()
    assert plan["engine"]["tensor_parallel_size"] == 2
    capsys.readouterr()
    assert main(["render", str(recipe), "--target", "vllm"]) == 0
    assert "vllm serve deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" in capsys.readouterr().out


def test_router_port_in_use_fails_apply_with_that_cause(state_dir: Path, tmp_path: Path, capsys) -> None:
    from vdeploy.router import bind
    from vdeploy.supervisor import free_port

    port = free_port()
    squatter = bind("127.0.0.1", port)  # someone else listens on the recipe's server.port
    recipe = _quickstart(tmp_path, name="port-clash", server={"port": port})
    try:
        assert main(["apply", str(recipe), "--timeout", "60"]) == 1
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port} (server.port): Address already in use" in err
    finally:
        squatter.close()
        assert main(["delete", "port-clash"]) == 0
    assert not list(state_dir.iterdir())


def test_logs_follow_prints_new_output(state_dir: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    from vdeploy.state import Deployment

    deployment = Deployment("demo")
    log = deployment.replica_log(1, 0)
    log.parent.mkdir(parents=True)
    log.write_text("loading\n")
    follow = subprocess.Popen(
        [sys.executable, "-m", "vdeploy.cli", "logs", "demo", "-f"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "VDEPLOY_STATE_DIR": str(state_dir)},
    )
    try:
        assert follow.stdout.readline() == "loading\n"
        time.sleep(0.3)
        with open(log, "a") as f:
            f.write("ready\n")
        assert follow.stdout.readline() == "ready\n"  # appended output shows up while following
    finally:
        follow.kill()
        follow.wait()
