"""HF architecture name (config.architectures[0]) -> the engine's module, imported only when a model is built, so the
control plane can ask `is_supported` without torch."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from engine.loader.errors import ModelLoadError

_LLAMA = "engine.models.llama:LlamaForCausalLM"
_BERT = "engine.models.bert:BertModel"
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": "engine.models.llama:Qwen2ForCausalLM",
    "OPTForCausalLM": "engine.models.opt:OPTForCausalLM",
    # Encoders for the pooling runner.
    "BertModel": _BERT,
    "BertForMaskedLM": _BERT,
    "BertForPreTraining": _BERT,
}


def is_supported(architecture: str) -> bool:
    return architecture in ARCHITECTURES


def model_class(hf_config: Any) -> type:
    """The module class for `hf_config`; a clear error naming the architecture when there is none."""
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise ModelLoadError(
            f"the model config names no architecture ('architectures' is empty); supported: {', '.join(ARCHITECTURES)}"
        )
    name = architectures[0]
    if name not in ARCHITECTURES:
        raise ModelLoadError(
            f"architecture {name!r} is not supported by the built-in engine; supported: {', '.join(ARCHITECTURES)}"
            " (the vllm backend may run it)"
        )
    module, _, cls = ARCHITECTURES[name].partition(":")
    return getattr(import_module(module), cls)
