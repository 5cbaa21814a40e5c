"""Loading a model for an EngineConfig: where its files are (local dir, GGUF file, hub id), its transformers config,
tokenizer and chat template, and the torch module with weights in place.

    hf_config = load_hf_config(config)
    tokenizer = load_tokenizer(config)
    model = load_model(config, hf_config)

Submodules load on first use, so importing `vdeploy_engine.loader` (say, for ModelLoadError) does not import torch.
"""

from importlib import import_module
from typing import Any

__all__ = ["ModelLoadError", "load_hf_config", "load_model", "load_tokenizer", "resolve_model"]

_HOMES = {
    "ModelLoadError": "vdeploy_engine.loader.errors",
    "resolve_model": "vdeploy_engine.loader.hub",
    "load_hf_config": "vdeploy_engine.loader.hf_config",
    "load_tokenizer": "vdeploy_engine.loader.tokenizer",
    "load_model": "vdeploy_engine.loader.model",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'vdeploy_engine.loader' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
