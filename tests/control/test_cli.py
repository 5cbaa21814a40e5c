"""The command line end to end: lint the shipped recipes, plan and explain the quick start, and stay torch-free."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.control.conftest import RECIPES, REPO


def test_shipped_recipes_lint_clean(cli):
    result = cli("lint", RECIPES)
    assert result.code == 0 and result.out == ""
    assert "0 error(s), 0 warning(s)" in result.err


def test_plan_quickstart_text(cli):
    result = cli("plan", RECIPES / "quickstart-smollm2-cpu.yaml")
    assert result.code == 0
    for line in ("deployment  quickstart-smollm2-cpu", "memory on the CPU", "weights", "kv cache", "12,272 tokens"):
        assert line in result.out


def test_plan_of_a_multi_recipe_file(cli):
    file = RECIPES / "jina-embeddings-v4-t4.yaml"
    both = cli("plan", file, "--format", "json").json()
    assert [p["name"] for p in both] == ["jina-v4-retrieval", "jina-v4-text-matching"]
    one = cli("plan", file, "--format", "json", "--name", "jina-v4-text-matching").json()
    assert one["engine"]["port"] == 8011
    assert cli("plan", file, "--name", "nope").code == 1


def test_plan_of_a_broken_recipe_exits_1_with_diagnostics(cli, write_recipe):
    result = cli("plan", write_recipe("model: facebook/opt-125m\nhardware: t4\ndtype: bf16\n"), "--format", "json")
    assert result.code == 1
    assert [d["code"] for d in result.json()["diagnostics"]] == ["VD103"]


def test_explain_gives_reasons(cli):
    result = cli("explain", RECIPES / "qwen2.5-7b-instruct-tp2.yaml")
    assert result.code == 0
    assert "dtype" in result.out and "because t4 lacks bfloat16 (compute capability 7.5 < 8.0)" in result.out
    assert "because CUDA graphs are unsafe on the t4" in result.out


def test_explain_lists_findings(cli, write_recipe):
    result = cli("explain", write_recipe("model: nobody/no-model\nhardware: t4\n"))
    assert result.code == 0 and "findings" in result.out and "VD202" in result.out


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_control_plane_never_imports_torch():
    """`import vdeploy.cli`, and linting every shipped recipe, load none of torch, triton or transformers."""
    code = (
        "import sys, vdeploy.cli\n"
        "heavy = {'torch', 'triton', 'transformers'}\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
        "from vdeploy.commands.lint import lint_paths\n"
        "diagnostics, checked = lint_paths(['recipes'])\n"
        "assert checked == 9 and not diagnostics, diagnostics\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_module_entry_point_reports_bad_input_without_traceback(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: facebook/opt-125m\nhardware: t4\nserver: {port: 70000}\n")
    result = subprocess.run([sys.executable, "-m", "vdeploy.cli", "lint", "--format", "json", str(recipe)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert json.loads(result.stdout)[0]["code"] == "VD005"
