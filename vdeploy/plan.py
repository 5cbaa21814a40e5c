"""The compiler's output: what an engine replica runs (`engine`), why (`decisions`), and whether it fits (`memory`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vdeploy.diagnostics import Diagnostic
from vdeploy_engine.config import EngineConfig, MemoryBudget


class Decision(BaseModel):
    field: str  # dotted recipe path, e.g. "memory.max_model_len"
    value: object
    reason: str


class Plan(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str  # the deployment (recipe) name
    profile: str  # hardware profile name
    gpu_count: int  # GPUs on the host the plan is for
    replicas: int = 1  # data_parallel_size
    backend: str = "builtin"  # builtin | vllm
    engine: EngineConfig
    env: dict[str, str] = Field(default_factory=dict)  # profile toolchain env merged with the recipe's env
    memory: MemoryBudget | None = None  # None when model facts were unavailable (memory not checked)
    decisions: list[Decision] = Field(default_factory=list)
    diagnostics: list[Diagnostic] = Field(default_factory=list)
    health: dict = Field(default_factory=dict)
    rollout: dict = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(d.severity == "error" for d in self.diagnostics)
