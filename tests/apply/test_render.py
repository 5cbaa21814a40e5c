from __future__ import annotations

import shlex
from typing import Any

import pytest
import yaml

from tests.apply.conftest import make_plan
from vdeploy.backends import BackendUnavailable, replica_command, replica_env
from vdeploy.render import RenderError, render

# `vllm serve` flags as listed in vLLM's engine-argument and server-argument documentation (docs.vllm.ai,
# "Engine Arguments"; Red Hat AI Inference Server "vLLM server arguments"). The renderer may use no other.
VLLM_FLAGS = {
    "--served-model-name", "--tokenizer", "--revision", "--download-dir", "--trust-remote-code", "--dtype",
    "--quantization", "--tensor-parallel-size", "--pipeline-parallel-size", "--data-parallel-size",
    "--distributed-executor-backend", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
    "--gpu-memory-utilization", "--block-size", "--kv-cache-dtype", "--swap-space", "--cpu-offload-gb", "--seed",
    "--chat-template", "--enforce-eager", "--no-enable-prefix-caching", "--no-enable-chunked-prefill", "--runner",
    "--convert", "--host", "--port", "--api-key",
}  # fmt: skip


def test_vllm_argv_is_the_seed_guides_command(seed_t4_plan: dict[str, Any]) -> None:
    line = render(seed_t4_plan, "vllm")
    words = shlex.split(line)
    # The T4 toolchain environment comes first, so FlashInfer's JIT builds with gcc-12.
    assert words[:3] == ["env", "CC=/usr/bin/gcc-12", "CXX=/usr/bin/g++-12"]
    argv = words[3:]
    assert argv[:3] == ["vllm", "serve", "/models/deepseek-Qwen2.5-7B"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    expected = {
        "--served-model-name": "Qwen2.5:0.5B",
        "--tensor-parallel-size": "2",
        "--max-model-len": "16384",
        "--max-num-seqs": "2",
        "--gpu-memory-utilization": "0.8",
        "--swap-space": "1",
        "--dtype": "float16",
        "--port": "8000",
    }
    for flag, value in expected.items():
        assert argv[argv.index(flag) + 1] == value, flag
    assert "--enforce-eager" in argv
    assert {w for w in argv if w.startswith("--")} <= VLLM_FLAGS
    assert flags  # the argv has flags at all


def test_vllm_flags_for_switches_and_replicas() -> None:
    plan = make_plan(
        replicas=2,
        enable_prefix_caching=False,
        trust_remote_code=True,
        runner="pooling",
        convert="embed",
        api_key_env="MY_KEY",
    )
    line = render(plan, "vllm")
    argv = shlex.split(line)
    for flag in ("--no-enable-prefix-caching", "--trust-remote-code", "--runner", "--convert"):
        assert flag in argv
    assert argv[argv.index("--data-parallel-size") + 1] == "2"
    assert 'VLLM_API_KEY="${MY_KEY}"' in line  # the key itself never lands in the rendered text
    assert {w for w in argv if w.startswith("--")} <= VLLM_FLAGS


def test_builtin_command_line() -> None:
    argv = shlex.split(render(make_plan(port=9000), "builtin", plan_path="/srv/demo.json"))
    assert argv == [
        "python3",
        "-m",
        "vdeploy_engine.server",
        "--config",
        "/srv/demo.json",
        "--host",
        "127.0.0.1",
        "--port",
        "9000",
    ]


def _k8s_objects(text: str) -> list[Any]:
    """Each document as the official client's model; a field the model does not know is an error."""
    from kubernetes import client

    api = client.ApiClient()
    objects = []
    for doc in yaml.safe_load_all(text):
        model = getattr(client, f"V1{doc['kind']}")
        obj = model.from_dict(doc)
        # from_dict drops unknown keys silently: the round trip shows them.
        assert api.sanitize_for_serialization(obj) == doc, f"{doc['kind']} has fields the Kubernetes API lacks"
        objects.append(obj)
    return objects


def test_k8s_manifests_are_valid_kubernetes_objects(seed_t4_plan: dict[str, Any]) -> None:
    config_map, deployment, service = _k8s_objects(render(seed_t4_plan, "k8s"))
    assert config_map.kind == "ConfigMap" and "plan.json" in config_map.data
    container = deployment.spec.template.spec.containers[0]
    assert container.resources.limits == {"nvidia.com/gpu": "2"}  # TP 2 = two GPUs per pod
    assert container.readiness_probe.http_get.path == "/health"
    assert container.liveness_probe.http_get.path == "/health"
    assert {"CC": "/usr/bin/gcc-12", "CXX": "/usr/bin/g++-12"} == {e.name: e.value for e in container.env}
    mounts = {m.mount_path for m in container.volume_mounts}
    assert "/dev/shm" in mounts  # tensor parallel needs shared memory beyond the container default
    assert container.args[container.args.index("--config") + 1] == "/etc/vdeploy/plan.json"
    assert deployment.spec.strategy.rolling_update.max_unavailable == 0
    assert service.spec.ports[0].port == 8000 and service.spec.ports[0].target_port == "http"


def test_k8s_vllm_cpu_plan_has_no_gpu_limit_no_configmap() -> None:
    plan = make_plan(backend="vllm", replicas=3, api_key_env="MY_KEY")
    objects = _k8s_objects(render(plan, "k8s"))
    assert [o.kind for o in objects] == ["Deployment", "Service"]
    deployment = objects[0]
    container = deployment.spec.template.spec.containers[0]
    assert deployment.spec.replicas == 3
    assert container.resources is None and container.volume_mounts is None
    assert container.command == ["vllm"] and container.args[0] == "serve"
    assert container.env[0].value_from.secret_key_ref.name == "demo-api-key"


def test_systemd_unit_runs_the_supervisor_in_the_foreground(tmp_path, seed_t4_plan) -> None:
    unit = render(seed_t4_plan, "systemd", recipe_path=str(tmp_path / "r.yaml"))
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith(f"apply {tmp_path / 'r.yaml'} --foreground")
    assert 'Environment="CC=/usr/bin/gcc-12"' in unit
    assert "KillMode=mixed" in unit


def test_unknown_target_is_an_error() -> None:
    with pytest.raises(RenderError, match="unknown target 'docker'"):
        render(make_plan(), "docker")


def test_supervised_replica_command_and_env(monkeypatch: pytest.MonkeyPatch, seed_t4_plan) -> None:
    argv = replica_command(seed_t4_plan, "/state/plan.json", 41234)
    assert argv[1:] == ["-m", "vdeploy_engine.server", "--config", "/state/plan.json", "--host", "127.0.0.1", "--port", "41234"]
    env = replica_env(seed_t4_plan, [2, 3])
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["CC"] == "/usr/bin/gcc-12"


def test_vllm_backend_without_vllm_installed_fails_with_that_message(monkeypatch) -> None:
    from vdeploy.backends import vllm

    monkeypatch.setattr(vllm, "executable", lambda: None)
    with pytest.raises(BackendUnavailable, match="vllm is not installed"):
        replica_command(make_plan(backend="vllm"), "/p.json", 1234)

