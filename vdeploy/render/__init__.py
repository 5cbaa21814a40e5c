"""Render a plan for engines and supervisors that already exist: a builtin or `vllm serve` command line, a systemd
unit that runs vdeploy's own supervisor, or Kubernetes manifests (ConfigMap + Deployment + Service)."""

from __future__ import annotations

import functools
import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vdeploy import secrets
from vdeploy.backends import builtin, vllm
from vdeploy.rollout import readiness_timeout

if TYPE_CHECKING:
    import jinja2

TARGETS = ("builtin", "vllm", "systemd", "k8s")
DEFAULT_IMAGES = {"builtin": "vdeploy:latest", "vllm": "vllm/vllm-openai:latest"}
K8S_PLAN_DIR = "/etc/vdeploy"  # where the ConfigMap with plan.json is mounted in the pod
RAY_PORT = 6379  # the Ray head's (GCS) port on a multi-host replica's leader pod


@functools.cache
def _templates() -> jinja2.Environment:
    import jinja2  # on first render only: `vdeploy --help` and `lint` need no template engine

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


class RenderError(Exception):
    pass


def engine_argv(plan: dict[str, Any], plan_path: str, host: str | None = None, port: int | None = None) -> list[str]:
    """The argv that starts one replica of `plan` on `host:port` (the plan's own address by default)."""
    engine = plan["engine"]
    host, port = host or engine["host"], port or engine["port"]
    if plan.get("backend", "builtin") == "vllm":
        return vllm.argv(engine, host=host, port=port)
    return builtin.argv(plan_path, host=host, port=port, python="python3")


def render(
    plan: dict[str, Any],
    target: str,
    *,
    recipe_path: str | None = None,
    plan_path: str | None = None,
    image: str | None = None,
) -> str:
    """The text of `target` for `plan` (a Plan serialised with `model_dump(mode="json")`)."""
    if target in ("builtin", "vllm"):
        return _command_line(plan, target, plan_path or f"{plan['name']}.plan.json")
    if target == "systemd":
        if recipe_path is None:
            raise RenderError("--target systemd needs the recipe file the unit will apply")
        vdeploy = shutil.which("vdeploy") or f"{sys.executable} -m vdeploy.cli"
        secret_env = secrets.secret_names(plan.get("env", {}))
        api_key_env = plan["engine"].get("api_key_env")
        return (
            _templates()
            .get_template("systemd.service.j2")
            .render(
                plan=plan,
                recipe=str(Path(recipe_path).resolve()),
                vdeploy=vdeploy,
                secret_env=secret_env,
                env_file=([api_key_env] if api_key_env else []) + secret_env,  # what the EnvironmentFile holds
            )
        )
    if target == "k8s":
        return _kubernetes(plan, image)
    raise RenderError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")


def _command_line(plan: dict[str, Any], target: str, plan_path: str) -> str:
    if target != plan.get("backend", "builtin"):
        plan = {**plan, "backend": target}
    argv = engine_argv(plan, plan_path)
    if target == "vllm" and plan.get("replicas", 1) > 1:
        argv += ["--data-parallel-size", str(plan["replicas"])]  # vLLM runs its replicas itself
    plan_env = plan.get("env", {})
    hidden = secrets.secret_names(plan_env)  # taken from the shell's environment, never written out
    env = [f'{k}="${{{k}}}"' if k in hidden else f"{k}={shlex.quote(str(v))}" for k, v in sorted(plan_env.items())]
    api_key_env = plan["engine"].get("api_key_env")
    if target == "vllm" and api_key_env:
        env.append(f'VLLM_API_KEY="${{{api_key_env}}}"')  # from the variable the recipe names, not in the text
    return " ".join(["env", *env, shlex.join(argv)] if env else [shlex.join(argv)]) + "\n"


def _kubernetes(plan: dict[str, Any], image: str | None) -> str:
    """One Deployment of one pod per replica; a replica larger than one host (its GPUs more than the plan's host
    has) is a leader pod (the Ray head and the engine, rank 0) and a worker pod per further host (a Ray node that
    holds its ranks, `distributed_executor_backend: ray`): a StatefulSet of leaders, one of workers per replica."""
    backend = plan.get("backend", "builtin")
    engine = plan["engine"]
    plan_path = f"{K8S_PLAN_DIR}/plan.json"
    ranks = engine["tensor_parallel_size"] * engine["pipeline_parallel_size"]
    gpus = ranks if engine["device"] == "cuda" else 0
    hosts = 1
    if gpus > plan["gpu_count"] > 0:  # the compiler made it whole hosts on ray
        gpus, hosts = plan["gpu_count"], gpus // plan["gpu_count"]
    argv = engine_argv(plan, plan_path, host="0.0.0.0")
    ray_start = f"ray start --num-gpus={gpus} --disable-usage-stats"
    env = plan.get("env", {})
    secret_env = secrets.secret_names(env)
    # The engine reads only the plan's engine settings; the ConfigMap's copy of the plan holds no secret.
    public_plan = {**plan, "env": {k: v for k, v in env.items() if k not in secret_env}}
    return (
        _templates()
        .get_template("k8s.yaml.j2")
        .render(
            plan=plan,
            name=plan["name"],
            engine=engine,
            argv=argv,
            hosts=hosts,
            # The leader starts the Ray head, then the engine, which joins it (RAY_ADDRESS) and waits for the workers.
            leader_argv=["sh", "-c", f"{ray_start} --head --port={RAY_PORT} && exec {shlex.join(argv)}"],
            worker_argv=["sh", "-c", f"exec {ray_start} --address=$VDEPLOY_RAY_LEADER:{RAY_PORT} --block"],
            ray_port=RAY_PORT,
            image=image or DEFAULT_IMAGES[backend],
            plan_json=json.dumps(public_plan, indent=2, sort_keys=True) if backend == "builtin" else None,
            secret_env=secret_env,
            literal_secrets={k: env[k] for k in secrets.literal_secrets(env)},
            plan_dir=K8S_PLAN_DIR,
            gpus=gpus,
            shared_memory=ranks > 1,
            health_path=(plan.get("health") or {}).get("path", "/health"),
            startup_seconds=int(readiness_timeout(plan)),
            blue_green=(plan.get("rollout") or {}).get("strategy") == "blue_green",
        )
    )
