"""`vdeploy pull` against a hub served by the test over real HTTP (tests/fixtures/fake_hub.py): the files land in
HF_HOME's cache, a dropped download resumes, the files are checked against the plan, and offline says what to set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.control.conftest import llama_config, write_safetensors
from tests.fixtures.fake_hub import COMMIT, FakeHub

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A small llama checkpoint (2 layers, zero weights, ~300 KB) as a hub repo's files."""
    folder = tmp_path_factory.mktemp("tiny-repo")
    h, i, v = 64, 128, 256
    tensors = {"model.embed_tokens.weight": ("F32", [v, h]), "lm_head.weight": ("F32", [v, h]),
               "model.norm.weight": ("F32", [h])}
    for layer in range(2):
        tensors[f"model.layers.{layer}.mlp.down_proj.weight"] = ("F32", [h, i])
    write_safetensors(folder / "model.safetensors", tensors)
    return {"config.json": json.dumps(llama_config()).encode(), "model.safetensors":
            (folder / "model.safetensors").read_bytes(), "README.md": b"not a weight: not pulled\n"}


def pull(*args: str, hub: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub, "HF_HOME": str(home)}
    for variable in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN"):
        env.pop(variable, None)
    return subprocess.run([sys.executable, "-m", "vdeploy.cli", "pull", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def snapshot(home: Path, repo: str) -> Path:
    return home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT


def test_pull_fetches_into_the_engines_cache_with_progress(tmp_path: Path, tiny_files) -> None:
    with FakeHub({"tiny-org/tiny-llama": tiny_files}) as hub:
        result = pull("tiny-org/tiny-llama", hub=hub.url, home=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = snapshot(tmp_path, "tiny-org/tiny-llama")
    assert (folder / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]
    assert not (folder / "README.md").exists()  # only what the engine loads
    assert result.stdout.strip() == f"tiny-org/tiny-llama: pulled at {folder} (LlamaForCausalLM, 0.00 GiB of weights)"
    pulling = [line for line in result.stderr.splitlines() if line.startswith("pull tiny-org/tiny-llama: pulling")]
    total = sum(len(tiny_files[f]) for f in ("config.json", "model.safetensors"))
    assert pulling and pulling[-1].startswith(f"pull tiny-org/tiny-llama: pulling {total / (1 << 30):.2f} GiB") \
        and "(100%)" in pulling[-1], result.stderr
    # The plan now reads the model's facts from the cache: its memory is checked.
    plan = subprocess.run([sys.executable, "-m", "vdeploy.cli", "plan", "-o", "json", str(_recipe(tmp_path))],
                          env={**os.environ, "HF_HOME": str(tmp_path)}, cwd=REPO, capture_output=True, text=True)
    assert json.loads(plan.stdout)["memory"]["kv_tokens"] > 0, plan.stderr


def _recipe(folder: Path, model: str = "tiny-org/tiny-llama") -> Path:
    path = folder / "recipe.yaml"
    path.write_text(f"name: tiny\nmodel: {model}\nhardware: cpu\nmemory: {{max_model_len: 256}}\n")
    return path


def test_a_dropped_download_resumes_where_it_stopped(tmp_path: Path, tiny_files) -> None:
    # 24 MB: more than huggingface_hub's 10 MB write chunk, so the part received before the drop is on disk.
    big = tmp_path / "big.safetensors"
    write_safetensors(big, {"model.embed_tokens.weight": ("F32", [6 * 1024 * 1024])})
    files = {**tiny_files, "model.safetensors": big.read_bytes()}
    with FakeHub({"tiny-org/tiny-llama": files}, cut_first_download=True) as hub:
        result = pull("tiny-org/tiny-llama", hub=hub.url, home=tmp_path)
    assert result.returncode == 0, result.stderr
    gets = [r for r in hub.requests if r[0] == "GET" and r[1].endswith("/model.safetensors")]
    assert len(gets) == 2 and gets[0][2] is None
    resumed_at = int(gets[1][2].removeprefix("bytes=").removesuffix("-"))  # it asked only for what it lacked
    assert 0 < resumed_at <= len(files["model.safetensors"]) // 2
    assert (snapshot(tmp_path, "tiny-org/tiny-llama") / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_files_that_are_not_the_planned_model_are_refused(tmp_path: Path, tiny_files) -> None:
    # The catalogue knows Qwen2.5-0.5B-Instruct (24 layers); this hub serves a 2-layer model under its name.
    with FakeHub({"Qwen/Qwen2.5-0.5B-Instruct": tiny_files}) as hub:
        result = pull(str(_recipe(tmp_path, "Qwen/Qwen2.5-0.5B-Instruct")), "-o", "json", hub=hub.url, home=tmp_path)
    assert result.returncode == 1
    [record] = json.loads(result.stdout)
    assert record["action"] == "failed" and "not the model the plan was made for" in record["reason"]
    assert "num_layers 2 (planned 24)" in record["reason"]


def test_offline_names_the_model_and_the_variables_to_set(tmp_path: Path) -> None:
    with FakeHub({}) as hub:
        closed = hub.url  # nothing listens here once the hub is gone
    result = pull("tiny-org/tiny-llama", hub=closed, home=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for words in ("cannot pull tiny-org/tiny-llama", f"The hub used is {closed}", "HF_ENDPOINT", "HF_TOKEN",
                  f"({tmp_path}, set by HF_HOME)", "HF_HUB_OFFLINE=1"):
        assert words in result.stderr, result.stderr


def test_a_local_model_needs_no_pull(tmp_path: Path) -> None:
    result = pull(str(REPO / "recipes" / "quickstart-smollm2-cpu.yaml"), hub="http://127.0.0.1:1", home=tmp_path)
    assert result.returncode == 0 and ": already local at " in result.stdout


def test_apply_fails_before_starting_anything_when_the_model_cannot_be_pulled(tmp_path: Path) -> None:
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:1", "HF_HOME": str(tmp_path / "hf"),
           "VDEPLOY_STATE_DIR": str(tmp_path / "state")}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-m", "vdeploy.cli", "apply", str(_recipe(tmp_path))], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "tiny: failed: cannot pull tiny-org/tiny-llama" in result.stderr and "HF_ENDPOINT" in result.stderr
    assert not (tmp_path / "state" / "tiny" / "revisions").exists()  # no revision, no supervisor


@pytest.mark.slow
def test_first_apply_on_a_new_machine_pulls_then_serves(tmp_path: Path, tiny_llama_dir: Path) -> None:
    import httpx

    from vdeploy.supervisor import free_port

    files = {p.name: p.read_bytes() for p in tiny_llama_dir.iterdir() if p.is_file()}
    port = free_port()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: tiny\nmodel: tiny-org/tiny-llama\nhardware: cpu\nmemory: {{max_model_len: 256}}\n"
                      f"server: {{port: {port}}}\n")
    with FakeHub({"tiny-org/tiny-llama": files}) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
               "VDEPLOY_STATE_DIR": str(tmp_path / "state")}
        env.pop("HF_HUB_OFFLINE", None)

        def vdeploy(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "vdeploy.cli", *args], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=300)

        try:
            result = vdeploy("apply", str(recipe))
            assert result.returncode == 0, result.stdout + result.stderr
            lines = result.stderr.splitlines()
            pulled = next(i for i, line in enumerate(lines) if "pull tiny-org/tiny-llama: pulling" in line)
            # A tiny model may load between two of the supervisor's looks at its phase: "starting" is always shown.
            started = next(i for i, line in enumerate(lines) if line.startswith("tiny revision 1 replica 0: starting"))
            assert pulled < started  # downloaded before the replica started, not inside its health-checked start
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                               json={"model": "tiny-org/tiny-llama", "prompt": "Hello", "max_tokens": 3})
            assert reply.status_code == 200, reply.text
        finally:
            vdeploy("delete", "tiny")
