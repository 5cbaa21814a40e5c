"""The built-in inference engine: `from vdeploy_engine import LLM, SamplingParams`.

Heavy modules (torch) load on first use, so `vdeploy_engine.config` stays importable by the torch-free control plane.
"""

from typing import Any

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str) -> Any:
    if name == "EngineConfig":
        from vdeploy_engine.config import EngineConfig

        return EngineConfig
    if name in ("LLM",):
        from vdeploy_engine.llm import LLM

        return LLM
    if name in ("SamplingParams",):
        from vdeploy_engine.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from vdeploy_engine import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'vdeploy_engine' has no attribute {name!r}")
