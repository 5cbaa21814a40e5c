"""Fixtures for apply/supervisor/router tests: a private state directory and plans built without the compiler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vdeploy.plan import Plan
from vdeploy_engine.config import EngineConfig


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "state"
    monkeypatch.setenv("VDEPLOY_STATE_DIR", str(root))
    return root


def make_plan(
    name: str = "demo",
    *,
    replicas: int = 1,
    gpu_count: int = 0,
    backend: str = "builtin",
    env: dict[str, str] | None = None,
    rollout: dict | None = None,
    **engine: Any,
) -> dict[str, Any]:
    """A Plan as the state stores it (`model_dump(mode="json")`)."""
    engine.setdefault("model", "/models/demo")
    plan = Plan(
        name=name,
        profile="cpu" if not gpu_count else "t4",
        gpu_count=gpu_count,
        replicas=replicas,
        backend=backend,
        engine=EngineConfig(**engine),
        env=env or {},
        rollout=rollout or {},
    )
    return plan.model_dump(mode="json")


@pytest.fixture
def seed_t4_plan() -> dict[str, Any]:
    """The seed guide's two-T4 deployment (DESIGN.md), as the compiler would resolve it."""
    return make_plan(
        "deepseek-qwen-7b",
        gpu_count=2,
        env={"CC": "/usr/bin/gcc-12", "CXX": "/usr/bin/g++-12"},
        model="/models/deepseek-Qwen2.5-7B",
        served_model_name="Qwen2.5:0.5B",
        device="cuda",
        dtype="float16",
        tensor_parallel_size=2,
        max_model_len=16384,
        max_num_seqs=2,
        gpu_memory_utilization=0.8,
        swap_space=1,
        enforce_eager=True,
        port=8000,
    )
