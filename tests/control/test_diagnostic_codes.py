"""Every diagnostic code, each from a minimal bad recipe run through `vdeploy lint --format json`: the code, its
location in the file, the exit status, and no traceback. This also covers the issue's "Bad input" list."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vdeploy.diagnostics import CODES

# (case id, recipe text, expected code, (line, column) of the diagnostic, expected exit status)
# {missing}, {truncated_gguf}, {cut_gguf}, {bad_config} are files made by the `files` fixture.
CASES = [
    ("not-yaml", "model: [x\nname: y\n", "VD001", (2, 5), 1),
    ("list-not-mapping", "- model: x\n- name: y\n", "VD002", (1, 1), 1),
    ("typo-key", "model: facebook/opt-125m\nhardware: t4\nmemroy: {max_model_len: 512}\n", "VD003", (3, 1), 1),
    ("typo-nested-key", "model: facebook/opt-125m\nhardware: t4\nmemory:\n  max_model_lenght: 512\n", "VD003",
     (4, 3), 1),
    ("missing-model", "name: no-model\nhardware: t4\n", "VD004", (1, 1), 1),
    ("utilization-zero", "model: facebook/opt-125m\nmemory:\n  gpu_memory_utilization: 0\n", "VD005", (3, 3), 1),
    ("utilization-1.5", "model: facebook/opt-125m\nmemory:\n  gpu_memory_utilization: 1.5\n", "VD005", (3, 3), 1),
    ("utilization-high", "model: facebook/opt-125m\nmemory:\n  gpu_memory_utilization: high\n", "VD005", (3, 3), 1),
    ("max-model-len-lots", "model: facebook/opt-125m\nmemory: {max_model_len: lots}\n", "VD005", (2, 10), 1),
    ("port-70000", "model: facebook/opt-125m\nhardware: t4\nserver:\n  port: 70000\n", "VD005", (4, 3), 1),
    ("task-embed", "model: facebook/opt-125m\ntask: embed\n", "VD006", (2, 1), 1),
    ("literal-api-key", "model: facebook/opt-125m\nserver:\n  api_key: sk-123\n", "VD007", (3, 3), 1),
    ("same-name-twice", "name: a\nmodel: facebook/opt-125m\nhardware: t4\n---\nname: a\nmodel: facebook/opt-125m\n"
     "hardware: t4\n", "VD008", (5, 1), 1),
    ("duplicate-key", "model: facebook/opt-125m\nhardware: t4\nhardware: cpu\n", "VD009", (3, 1), 1),
    ("empty-file", "# nothing here\n", "VD010", (1, 1), 0),
    ("secret-in-env", "model: facebook/opt-125m\nhardware: t4\nenv:\n  HF_TOKEN: hf_abcdefgh12345678\n", "VD012",
     (4, 3), 0),
    ("unknown-profile", "model: facebook/opt-125m\nhardware: t5\n", "VD101", (2, 1), 1),
    ("too-few-gpus", "model: Qwen/Qwen2.5-7B-Instruct\nhardware: t4\nparallelism:\n  tensor_parallel_size: 2\n",
     "VD102", (4, 3), 1),
    ("bf16-on-t4", "model: facebook/opt-125m\nhardware: t4\ndtype: bfloat16\n", "VD103", (3, 1), 1),
    ("fp8-on-t4", "model: Qwen/Qwen2.5-7B-Instruct\nhardware: t4\nquantization: fp8\n", "VD104", (3, 1), 1),
    ("graphs-on-t4", "model: facebook/opt-125m\nhardware: t4\nruntime: {enforce_eager: false}\n", "VD105", (3, 11), 0),
    ("hardware-auto", "model: facebook/opt-125m\nhardware: auto\n", "VD106", (2, 1), 0),
    ("path-missing", "model: {missing}\nhardware: cpu\n", "VD201", (1, 1), 1),
    ("unknown-hub-id", "model: nobody/no-such-model\nhardware: t4\n", "VD202", (1, 1), 0),
    ("truncated-gguf-header", "model: {truncated_gguf}\nhardware: cpu\n", "VD203", (1, 1), 1),
    ("truncated-gguf-data", "model: {cut_gguf}\nhardware: cpu\n", "VD203", (1, 1), 1),
    ("malformed-config", "model: {bad_config}\nhardware: cpu\n", "VD204", (1, 1), 1),
    ("embedding-model-generate", "model: sentence-transformers/all-MiniLM-L6-v2\nhardware: t4\nrunner: generate\n",
     "VD205", (3, 1), 1),
    ("tp3-14-heads", "model: Qwen/Qwen2.5-0.5B-Instruct\nhardware: {profile: t4, count: 4}\n"
     "parallelism: {tensor_parallel_size: 3}\n", "VD206", (3, 15), 1),
    ("too-long-context", "model: facebook/opt-125m\nhardware: t4\nmemory: {max_model_len: 100000}\n", "VD207",
     (3, 10), 1),
    ("awq-on-plain-checkpoint", "model: Qwen/Qwen2.5-7B-Instruct\nhardware: l4\nquantization: awq\n", "VD208", (3, 1),
     1),
    ("remote-code", "model: jinaai/jina-embeddings-v4-vllm-retrieval\nhardware: l4\n", "VD209", (1, 1), 1),
    ("builtin-cannot-run", "model: facebook/opt-125m\nhardware: t4\nmemory: {cpu_offload_gb: 4}\n", "VD210",
     (3, 10), 1),
    ("prefixes-on-vllm", "model: sentence-transformers/all-MiniLM-L6-v2\nhardware: t4\nbackend: vllm\n"
     "server:\n  embedding_prefixes: {query: 'query: '}\n", "VD211", (5, 3), 1),
    ("prefixes-when-generating", "model: facebook/opt-125m\nhardware: t4\n"
     "server:\n  embedding_prefixes: {query: 'query: '}\n", "VD205", (4, 3), 1),
    ("weights-too-big", "model: Qwen/QwQ-32B\nhardware: t4\n", "VD301", (1, 1), 1),
    ("context-too-big", "model: Qwen/Qwen2.5-72B-Instruct\nhardware: {profile: h100-80gb, count: 2}\n"
     "parallelism: {tensor_parallel_size: 2}\nmemory: {max_model_len: 32768, max_num_seqs: 32}\n", "VD302", (4, 10),
     1),
    ("no-chunked-prefill", "model: facebook/opt-125m\nhardware: t4\nmemory: {max_num_batched_tokens: 512}\n"
     "runtime: {enable_chunked_prefill: false}\n", "VD303", (3, 10), 1),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf_path: Path) -> dict[str, str]:
    tmp_path = tmp_path_factory.mktemp("broken-models")
    truncated = tmp_path / "truncated.gguf"  # the header stops inside the vocabulary
    truncated.write_bytes(smollm2_gguf_path.read_bytes()[:200_000])
    cut = tmp_path / "cut.gguf"  # header intact, last tensor's data missing
    cut.write_bytes(smollm2_gguf_path.read_bytes()[:-1000])
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"hidden_size": 64,\n "num_attention_heads": }\n')
    return {"missing": str(tmp_path / "no-such-folder"), "truncated_gguf": str(truncated), "cut_gguf": str(cut),
            "bad_config": str(bad)}


def test_every_code_has_a_case():
    # VD011 (a path that cannot be read) has its own tests below: it is about the file, not its contents.
    assert {code for _, _, code, _, _ in CASES} | {"VD011"} == set(CODES)


@pytest.mark.parametrize(("text", "code", "where", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_code(cli, write_recipe, files, text, code, where, status):
    for name, value in files.items():
        text = text.replace("{" + name + "}", value)
    path = write_recipe(text)
    result = cli("lint", "--format", "json", path)
    found = [d for d in result.json() if d["code"] == code]
    assert found, f"expected {code}, got {result.out}"
    diagnostic = found[0]
    assert (diagnostic["file"], diagnostic["line"], diagnostic["column"]) == (str(path), *where)
    assert diagnostic["message"] and diagnostic["severity"] in ("error", "warning", "info")
    assert set(diagnostic) == {"code", "severity", "file", "line", "column", "message", "hint"}
    assert result.code == status
    assert "Traceback" not in result.out + result.err


def test_lint_missing_path_is_vd011(cli, tmp_path):
    result = cli("lint", "--format", "json", tmp_path / "nowhere.yaml")
    assert result.code == 1
    assert [d["code"] for d in result.json()] == ["VD011"]


def test_unreadable_file_is_vd011(cli, tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00model: x")
    result = cli("lint", "--format", "json", path)
    assert result.code == 1 and result.json()[0]["code"] == "VD011"


def test_text_output_names_file_line_column_and_hint(cli, write_recipe):
    path = write_recipe("model: facebook/opt-125m\nhardware: t4\ndtype: bfloat16\n")
    result = cli("lint", path)
    assert result.code == 1
    assert f"{path}:3:1: error[VD103] bfloat16 needs compute capability 8.0 or higher; the t4 has 7.5" in result.out
    assert "hint: use `dtype: half`" in result.out


def test_typo_suggests_the_right_key(cli, write_recipe):
    result = cli("lint", "--format", "json", write_recipe("model: x\nmemory:\n  max_num_seq: 4\n"))
    [typo] = [d for d in result.json() if d["code"] == "VD003"]
    assert typo["hint"] == "did you mean 'max_num_seqs'?"


def test_key_at_the_wrong_level_is_placed(cli, write_recipe):
    result = cli("lint", "--format", "json", write_recipe("model: x\nmax_model_len: 4\n"))
    [typo] = [d for d in result.json() if d["code"] == "VD003"]
    assert typo["hint"] == "did you mean 'memory.max_model_len'?"


def test_task_key_says_runner_and_convert(cli, write_recipe):
    result = cli("lint", "--format", "json", write_recipe("model: x\ntask: embed\n"))
    [task] = [d for d in result.json() if d["code"] == "VD006"]
    assert "runner: pooling" in task["hint"] and "convert: embed" in task["hint"]


def test_fit_errors_say_what_would_fit(cli, write_recipe):
    result = cli("lint", "--format", "json", write_recipe(CASES[[c[0] for c in CASES].index("context-too-big")][1]))
    [err] = [d for d in result.json() if d["code"] == "VD302"]
    assert "`max_model_len: 8848` (the largest that fits)" in err["hint"]
    assert "`gpu_memory_utilization: 0.95`" in err["hint"]
    assert "`tensor_parallel_size: 4`" in err["hint"]
    assert "AWQ" in err["hint"]


def test_strict_fails_on_warnings(cli, write_recipe):
    path = write_recipe("model: nobody/no-such-model\nhardware: t4\n")
    assert cli("lint", path).code == 0
    assert cli("lint", "--strict", path).code == 1


def test_sarif_and_github_formats(cli, write_recipe):
    path = write_recipe("model: facebook/opt-125m\nhardware: t4\ndtype: bfloat16\n")
    sarif = json.loads(cli("lint", "--format", "sarif", path).out)
    [result] = sarif["runs"][0]["results"]
    assert result["ruleId"] == "VD103" and result["level"] == "error"
    region = result["locations"][0]["physicalLocation"]["region"]
    assert (region["startLine"], region["startColumn"]) == (3, 1)
    github = cli("lint", "--format", "github", path).out.strip()
    assert github.startswith(f"::error file={path},line=3,col=1,title=VD103::bfloat16 needs")


def test_lint_takes_folders_and_globs(cli, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.yaml").write_text("model: facebook/opt-125m\nhardware: t4\n")
    (tmp_path / "two.yml").write_text("model: facebook/opt-125m\nhardware: t5\n")
    (tmp_path / "notes.txt").write_text("not a recipe")
    folder = cli("lint", "--format", "json", tmp_path)
    assert [d["code"] for d in folder.json()] == ["VD101"]
    assert cli("lint", tmp_path / "a").code == 0
    globbed = cli("lint", "--format", "json", str(tmp_path / "*.yml"))
    assert [Path(d["file"]).name for d in globbed.json()] == ["two.yml"]


def test_codes_listing(cli):
    result = cli("lint", "--codes")
    assert result.code == 0 and all(code in result.out for code in CODES)


def test_seed_recipes_copied_elsewhere_still_lint(cli, tmp_path):
    """Recipes do not depend on where they sit (no relative model paths)."""
    for recipe in (Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"):
        shutil.copy(recipe, tmp_path)
    assert cli("lint", tmp_path).code == 0
