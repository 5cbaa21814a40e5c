"""The wheel is complete: built from this tree, it holds only our own top-level modules, the profiles, the schema and
the templates, and installed into a clean virtualenv it works from an empty folder (no checkout beside it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_TOP_LEVEL = {"vdeploy", "vdeploy_engine", "vdeploy_kernels"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, cwd=out)
    (found,) = out.glob("vdeploy-*.whl")
    return found


def test_wheel_holds_our_modules_profiles_schema_and_templates(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == OUR_TOP_LEVEL  # no generic `engine` or `kernels` in site-packages
    profiles = {Path(n).name for n in names if n.startswith("vdeploy/data/profiles/")}
    assert profiles == {p.name for p in (ROOT / "profiles").glob("*.yaml")}
    assert "vdeploy/data/recipe.schema.json" in names and "vdeploy/data/models.yaml" in names
    assert {"vdeploy/render/templates/k8s.yaml.j2", "vdeploy/render/templates/systemd.service.j2"} <= set(names)
    assert "vdeploy_kernels/attention.py" in names and "vdeploy_engine/server/__main__.py" in names
    entry_points = zipfile.ZipFile(wheel).read("vdeploy-0.1.0.dist-info/entry_points.txt").decode()
    assert "vdeploy.compiler:engine_config_from_args" in entry_points  # LLM(...)'s planner


@pytest.mark.slow
def test_installed_wheel_works_from_an_empty_folder(wheel, tmp_path):
    """The control plane alone (no engine extra), as a CI box that only lints has it."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    subprocess.run([bin_dir / "pip", "install", "-q", "-c", ROOT / "requirements.lock", wheel], check=True,
                   capture_output=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = shutil.copy(ROOT / "recipes" / "qwen2.5-7b-instruct-tp2.yaml", empty / "recipe.yaml")

    def vdeploy(*args: str) -> str:
        result = subprocess.run([bin_dir / "vdeploy", *args], cwd=empty, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    listed = vdeploy("profiles", "list")
    assert all(name in listed for name in ("t4", "a100-80gb", "h100-80gb", "cpu"))
    vdeploy("lint", str(recipe))
    assert "max_model_len" in vdeploy("plan", str(recipe))
    assert '"properties"' in vdeploy("schema")
    # Nothing of the engine came with it, and the control plane did not need it.
    probe = "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('vdeploy_engine.config'))"
    out = subprocess.run([bin_dir / "python", "-c", probe], cwd=empty, capture_output=True, text=True).stdout
    assert out.startswith("True") and "site-packages" in out
