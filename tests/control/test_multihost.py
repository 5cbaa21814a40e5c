"""A deployment larger than one host: the compiler's checks (whole hosts, the ray executor) and the Kubernetes
leader/worker layout `vdeploy render --target k8s` writes for it, read back through the kubernetes client's models."""

from __future__ import annotations

from tests.apply.test_render import _k8s_objects
from vdeploy.render import render


def test_k8s_replica_larger_than_a_host_is_a_ray_leader_and_its_workers(cli, write_recipe) -> None:
    """Qwen2.5-72B at TP 8 x PP 2 over two 8-GPU hosts, two replicas (4 hosts): per replica a leader pod (the Ray
    head, then the engine) and one worker pod that joins it by the leaders' headless Service; the HTTP Service
    selects the leaders only."""
    recipe = write_recipe(
        "name: big\nmodel: Qwen/Qwen2.5-72B-Instruct\nhardware: {profile: h100-80gb, count: 8, nodes: 4}\n"
        "parallelism: {tensor_parallel_size: 8, pipeline_parallel_size: 2, data_parallel_size: 2}\n"
    )
    plan = cli("plan", "--format", "json", recipe).json()
    assert plan["engine"]["distributed_executor_backend"] == "ray"  # decided: a replica spans two hosts
    objects = _k8s_objects(render(plan, "k8s"))
    assert [o.kind for o in objects] == ["ConfigMap", "Service", "StatefulSet", "StatefulSet", "StatefulSet",
                                         "Service"]
    _, headless, leaders, worker0, worker1, service = objects
    assert headless.spec.cluster_ip == "None" and headless.spec.publish_not_ready_addresses
    assert leaders.spec.replicas == 2 and leaders.spec.service_name == "big-leader"
    leader = leaders.spec.template.spec.containers[0]
    assert leader.resources.limits == {"nvidia.com/gpu": "8"}
    assert leader.command == ["sh"] and leader.args[1].startswith("ray start --num-gpus=8 --disable-usage-stats --head")
    assert "exec python3 -m vdeploy_engine.server --config /etc/vdeploy/plan.json" in leader.args[1]
    assert ("RAY_ADDRESS", "127.0.0.1:6379") in [(e.name, e.value) for e in leader.env]
    for replica, workers in enumerate((worker0, worker1)):
        assert workers.metadata.name == f"big-worker-{replica}" and workers.spec.replicas == 1
        container = workers.spec.template.spec.containers[0]
        assert container.resources.limits == {"nvidia.com/gpu": "8"}
        assert "--address=$VDEPLOY_RAY_LEADER:6379 --block" in container.args[1]
        assert container.env[0].value == f"big-leader-{replica}.big-leader"
        assert workers.spec.template.metadata.labels != leaders.spec.template.metadata.labels
    assert service.spec.selector == leaders.spec.template.metadata.labels


def test_a_replica_across_hosts_needs_ray_and_whole_hosts(cli, write_recipe) -> None:
    base = "model: Qwen/Qwen2.5-72B-Instruct\nhardware: {profile: h100-80gb, count: 8, nodes: 2}\n"
    mp = cli("lint", "--format", "json", write_recipe(
        base + "parallelism: {tensor_parallel_size: 8, pipeline_parallel_size: 2, distributed_executor_backend: mp}\n"))
    assert any(d["code"] == "VD102" and "mp executor" in d["message"] for d in mp.json())
    uneven = cli("lint", "--format", "json", write_recipe(
        base + "parallelism: {tensor_parallel_size: 4, pipeline_parallel_size: 3}\n"))
    assert any(d["code"] == "VD102" and "whole hosts" in d["message"] for d in uneven.json())
