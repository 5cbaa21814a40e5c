"""Loading from every kind of source, and the clear errors for what cannot be loaded."""

from __future__ import annotations

import http.server
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.models.harness import forward_no_cache, load_engine_model
from vdeploy_engine.config import EngineConfig
from vdeploy_engine.loader import ModelLoadError, load_hf_config, load_model, load_tokenizer, resolve_model

SEQUENCES = [[5, 6, 7, 8, 9, 10], [40, 41, 42]]


@pytest.fixture
def llama_copy(tiny_llama_dir, tmp_path) -> Path:
    """A private copy of the tiny Llama that a test may damage."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


def _logits(path: Path) -> list[torch.Tensor]:
    return forward_no_cache(load_engine_model(path), SEQUENCES)


def test_sharded_safetensors_with_index_load_the_same_model(tiny_llama_dir, tmp_path):
    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert (sharded / "model.safetensors.index.json").is_file() and len(shards) > 2
    for got, want in zip(_logits(sharded), _logits(tiny_llama_dir), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_pytorch_bin_checkpoint_loads_the_same_model(tiny_llama_dir, tmp_path):
    """Old repositories ship only pytorch_model.bin."""
    old = Path(shutil.copytree(tiny_llama_dir, tmp_path / "bin"))
    torch.save(load_file(old / "model.safetensors"), old / "pytorch_model.bin")
    (old / "model.safetensors").unlink()
    for got, want in zip(_logits(old), _logits(tiny_llama_dir), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_opt_checkpoint_with_facebook_names_loads(tiny_opt_dir, tmp_path):
    """facebook/opt-* checkpoints name tensors `decoder.*`, without the `model.` prefix."""
    renamed = Path(shutil.copytree(tiny_opt_dir, tmp_path / "opt"))
    tensors = load_file(renamed / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, renamed / "model.safetensors")
    for got, want in zip(_logits(renamed), _logits(tiny_opt_dir), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_index_naming_a_missing_shard_is_reported(tiny_llama_dir, tmp_path):
    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(sharded, max_shard_size="100KB")
    lost = sorted(sharded.glob("model-*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(
        ModelLoadError, match=rf"model.safetensors.index.json: lists shard\(s\) that are not there: {lost.name}"
    ):
        load_engine_model(sharded)


def test_unsupported_architecture_names_it_and_the_supported_ones(llama_copy):
    config_file = llama_copy / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="'FalconForCausalLM' is not supported.*LlamaForCausalLM.*OPTForCausalLM"):
        load_engine_model(llama_copy)


def test_config_without_architectures_falls_back_on_model_type(llama_copy, tiny_llama_dir):
    config_file = llama_copy / "config.json"
    config = json.loads(config_file.read_text())
    del config["architectures"]
    config_file.write_text(json.dumps(config))
    for got, want in zip(_logits(llama_copy), _logits(tiny_llama_dir), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_malformed_config_json_gives_file_line_and_column(llama_copy):
    (llama_copy / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}')
    with pytest.raises(ModelLoadError, match=r"config.json:3:21: not valid JSON \(Expecting property name"):
        load_engine_model(llama_copy)


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_engine_model(tmp_path)


def test_truncated_safetensors_is_reported_with_its_file(llama_copy):
    weights = llama_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"model.safetensors: not a readable safetensors file"):
        load_engine_model(llama_copy)


def test_checkpoint_missing_a_tensor_names_it(llama_copy):
    weights = llama_copy / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks weights .*model.layers.1.self_attn.qkv_proj.weight\[k\]"):
        load_engine_model(llama_copy)


def test_config_that_does_not_match_the_weights_names_the_tensor(llama_copy):
    config_file = llama_copy / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "intermediate_size": 96}))
    with pytest.raises(
        ModelLoadError, match=r"tensor 'model.layers.0.mlp.\w+_proj.weight': expected shape .*96.*got .*128"
    ):
        load_engine_model(llama_copy)


def test_quantized_checkpoints_are_refused_by_name(llama_copy):
    config_file = llama_copy / "config.json"
    quantized = {"quant_method": "awq", "bits": 4, "group_size": 128}
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "quantization_config": quantized}))
    with pytest.raises(ModelLoadError, match="the checkpoint is quantized with awq, which the built-in engine cannot"):
        load_engine_model(llama_copy)


def test_quantization_setting_without_kernels_is_refused(tiny_llama_dir):
    config = EngineConfig(model=str(tiny_llama_dir), quantization="fp8")
    with pytest.raises(ModelLoadError, match="quantization: fp8, which the built-in engine cannot run yet"):
        load_model(config, load_hf_config(config))


def test_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        resolve_model("model.Q4_K_M.gguf")


def _hub_cache(root: Path, model_id: str, source: Path) -> None:
    """Lays `source` out as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<commit>/}."""
    repo = root / f"models--{model_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_is_served_from_the_cache_under_hf_home_when_offline(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_cache(tmp_path / "hf" / "hub", "tiny-org/tiny-llama", tiny_llama_dir)
    for got, want in zip(_logits("tiny-org/tiny-llama"), _logits(tiny_llama_dir), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    tokenizer = load_tokenizer(EngineConfig(model="tiny-org/tiny-llama"))
    assert tokenizer.decode(tokenizer("你好").input_ids) == "你好"


def test_download_dir_takes_precedence_over_hf_home(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_cache(tmp_path / "downloads", "tiny-org/tiny-llama", tiny_llama_dir)
    path = resolve_model("tiny-org/tiny-llama", download_dir=str(tmp_path / "downloads"))
    assert path.parent.parent == tmp_path / "downloads" / "models--tiny-org--tiny-llama"


def test_offline_hub_id_not_in_the_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelLoadError, match=r"model 'Qwen/Qwen2.5-0.5B-Instruct': could not get it from the local cache"
    ):
        load_hf_config(EngineConfig(model="Qwen/Qwen2.5-0.5B-Instruct"))


def test_hub_id_is_fetched_from_hf_endpoint(tmp_path, monkeypatch):
    """A hub that answers 404 to everything: the request goes to HF_ENDPOINT and the error names id and endpoint."""
    requested: list[str] = []

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            requested.append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        with pytest.raises(ModelLoadError, match=rf"model 'some-org/missing-model': could not get it from {endpoint}"):
            resolve_model("some-org/missing-model")
    finally:
        server.shutdown()
    assert any("some-org/missing-model" in path for path in requested)


def test_modelscope_id_without_the_package_says_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "modelscope" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelLoadError, match=r"'modelscope:qwen/Qwen2.5-0.5B' needs the modelscope package"):
        resolve_model("modelscope:qwen/Qwen2.5-0.5B")


def test_chat_template_override_inline_and_from_a_file(tiny_llama_dir, tmp_path):
    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    messages = [{"role": "user", "content": "你好"}]
    tokenizer = load_tokenizer(EngineConfig(model=str(tiny_llama_dir), chat_template=inline))
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "[user] 你好\n"
    template_file = tmp_path / "template.jinja"
    template_file.write_text("{{ messages[0]['content'] }}!")
    tokenizer = load_tokenizer(EngineConfig(model=str(tiny_llama_dir), chat_template=str(template_file)))
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "你好!"
    with pytest.raises(ModelLoadError, match="chat_template: file .*missing.jinja' does not exist"):
        load_tokenizer(EngineConfig(model=str(tiny_llama_dir), chat_template=str(tmp_path / "missing.jinja")))


def test_model_lands_on_the_configured_device_and_dtype_in_eval_mode(tiny_opt_dir):
    config = EngineConfig(model=str(tiny_opt_dir), dtype="float16")
    model = load_model(config, load_hf_config(config))
    assert not model.training
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.float16)}


def test_registry_and_loader_errors_import_without_torch():
    """The control plane asks `is_supported` and catches ModelLoadError without paying for torch."""
    code = (
        "import sys; import vdeploy_engine.loader; from vdeploy_engine.loader import ModelLoadError; "
        "from vdeploy_engine.models.registry import is_supported; "
        "assert is_supported('Qwen2ForCausalLM') and not is_supported('FalconForCausalLM'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
