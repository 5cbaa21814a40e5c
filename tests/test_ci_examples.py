"""The CI examples (examples/ci/) cannot rot: every command step of the GitHub Actions workflow and of the GitLab
pipeline runs here, as a runner would run it (bash -eo pipefail), against a temporary state directory and a recipe
folder holding the quick start. The lifecycle: a pull request (lint, plan says "would change"), the merge (apply
rolls it out for real), then the GitLab pipeline on the same host (plan says nothing changes, apply is a no-op)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vdeploy.supervisor import free_port

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "ci"
INSTALL = "pip install vdeploy"  # the runner's install step; here vdeploy is installed already


def github_steps(job: str) -> list[str]:
    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    return [step["run"] for step in workflow["jobs"][job]["steps"] if "run" in step and step["run"] != INSTALL]


def gitlab_steps(job: str) -> list[str]:
    pipeline = yaml.safe_load((EXAMPLES / "gitlab-ci.yml").read_text())
    spec = pipeline[job]
    lines = spec.get("before_script", []) + spec["script"] + spec.get("after_script", [])
    return [line for line in lines if line != INSTALL]


@pytest.fixture
def workspace(tmp_path: Path):
    """A checkout of a recipes repository, and the runner's environment."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart-smollm2-cpu.yaml").read_text())
    recipe.update(name="ci-quickstart", server={"port": free_port()})
    (recipes / "quickstart.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "VDEPLOY_STATE_DIR": str(tmp_path / "state"), "RECIPES": "recipes",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    yield tmp_path, env
    subprocess.run([sys.executable, "-m", "vdeploy.cli", "delete", "ci-quickstart"], env=env, capture_output=True,
                   timeout=120)


def run_steps(steps: list[str], workspace: tuple[Path, dict]) -> str:
    folder, env = workspace
    out = ""
    for step in steps:
        result = subprocess.run(["bash", "-eo", "pipefail", "-c", step], cwd=folder, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"step failed: {step}\n{result.stdout}\n{result.stderr}"
        out += result.stdout
    return out


def test_the_examples_declare_the_recipes_folder_their_steps_use():
    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    pipeline = yaml.safe_load((EXAMPLES / "gitlab-ci.yml").read_text())
    assert workflow["env"]["RECIPES"] == pipeline["variables"]["RECIPES"] == "recipes"
    assert shutil.which("bash")


@pytest.mark.slow
def test_ci_examples_run_a_deployment_from_pull_request_to_merge(workspace):
    folder, env = workspace
    # The pull request: lint writes SARIF with no findings; plan sees a new deployment.
    run_steps(github_steps("lint"), workspace)
    sarif = json.loads((folder / "vdeploy.sarif").read_text())
    assert sarif["version"] == "2.1.0" and sarif["runs"][0]["results"] == []
    assert "apply would change something: 1" in run_steps(github_steps("plan"), workspace)
    # The merge: apply rolls it out, status shows it serving.
    out = run_steps(github_steps("apply"), workspace)
    assert "ci-quickstart: rolled out (revision 1)" in out and "ci-quickstart" in out.splitlines()[-1]
    # GitLab on the same host: nothing left to change.
    run_steps(gitlab_steps("lint"), workspace)
    assert "apply would change something: 0" in run_steps(gitlab_steps("plan"), workspace)
    assert "ci-quickstart: unchanged (revision 1)" in run_steps(gitlab_steps("apply"), workspace)


def test_a_broken_recipe_fails_the_lint_step(workspace):
    folder, _ = workspace
    (folder / "recipes" / "broken.yaml").write_text("model: facebook/opt-125m\nhardware: t4\ndtype: bf16\n")
    with pytest.raises(AssertionError, match="step failed"):
        run_steps(github_steps("lint"), workspace)
    findings = json.loads((folder / "vdeploy.sarif").read_text())["runs"][0]["results"]
    assert [f["ruleId"] for f in findings] == ["VD103"]  # the report is still written for the upload step
