"""How a replica of a plan is started: the argv and environment for the builtin engine or for vLLM."""

from __future__ import annotations

import os
from typing import Any

from vdeploy import secrets
from vdeploy.backends import builtin, vllm


class BackendUnavailable(Exception):
    """The plan's backend cannot run on this machine (e.g. `backend: vllm` without vllm installed)."""


def replica_command(plan: dict[str, Any], plan_path: str, port: int) -> list[str]:
    """The argv of one replica of `plan`, serving on 127.0.0.1:`port` behind the router."""
    backend = plan.get("backend", "builtin")
    if backend == "builtin":
        return builtin.argv(plan_path, host="127.0.0.1", port=port)
    if backend == "vllm":
        executable = vllm.executable()
        if executable is None:
            raise BackendUnavailable(
                "backend: vllm, but vllm is not installed here (no `vllm` on PATH and no `vllm` Python package): "
                "`pip install vllm`, or use `backend: builtin`"
            )
        return [executable, *vllm.argv(plan["engine"], host="127.0.0.1", port=port)[1:]]
    raise BackendUnavailable(f"unknown backend {backend!r}: use builtin or vllm")


def replica_env(plan: dict[str, Any], gpus: list[int] | None) -> dict[str, str]:
    """The replica's environment: ours, then the plan's (profile toolchain + recipe env, `${NAME}` references
    resolved from ours: EnvReferenceError if one is unset), then its GPUs."""
    env = {**os.environ, **secrets.resolve(plan.get("env", {}), os.environ)}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    api_key_env = plan["engine"].get("api_key_env")
    if plan.get("backend") == "vllm" and api_key_env and api_key_env in os.environ:
        env["VLLM_API_KEY"] = os.environ[api_key_env]  # the key stays out of argv (visible in `ps`)
    env.setdefault("PYTHONUNBUFFERED", "1")  # logs reach the file as they happen, for root-cause search
    return env
