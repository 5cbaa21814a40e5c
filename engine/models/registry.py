"""HF architecture name (config.architectures[0]) -> the engine's module, imported only when a model is built, so the
control plane can ask `is_supported` without torch."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from vdeploy_engine.loader.errors import ModelLoadError

_LLAMA = "vdeploy_engine.models.llama:LlamaForCausalLM"
_BERT = "vdeploy_engine.models.bert:BertModel"
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": "vdeploy_engine.models.llama:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "vdeploy_engine.models.qwen3:Qwen3ForCausalLM",
    "Gemma3ForCausalLM": "vdeploy_engine.models.gemma3:Gemma3ForCausalLM",
    "Qwen3MoeForCausalLM": "vdeploy_engine.models.moe:Qwen3MoeForCausalLM",
    "MixtralForCausalLM": "vdeploy_engine.models.moe:MixtralForCausalLM",
    "OPTForCausalLM": "vdeploy_engine.models.opt:OPTForCausalLM",
    # Qwen2.5-VL's language model on text (jina-embeddings-v4's backbone, for the pooling runner).
    "Qwen2_5_VLForConditionalGeneration": "vdeploy_engine.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
    # Encoders for the pooling runner.
    "BertModel": _BERT,
    "BertForMaskedLM": _BERT,
    "BertForPreTraining": _BERT,
    "BertForSequenceClassification": "vdeploy_engine.models.bert:BertForSequenceClassification",
    # Decoders with a score head (reward models, decoder rerankers), for the pooling runner.
    "LlamaForSequenceClassification": "vdeploy_engine.models.llama:LlamaForSequenceClassification",
    "MistralForSequenceClassification": "vdeploy_engine.models.llama:LlamaForSequenceClassification",
    "Qwen2ForSequenceClassification": "vdeploy_engine.models.llama:Qwen2ForSequenceClassification",
}

# For configs that leave `architectures` out: the usual architecture of each model_type.
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "opt": "OPTForCausalLM",
    "bert": "BertModel",
}


def is_supported(architecture: str) -> bool:
    return architecture in ARCHITECTURES


def model_class(hf_config: Any) -> type:
    """The module class for `hf_config`; a clear error naming the architecture when there is none."""
    architectures = getattr(hf_config, "architectures", None) or []
    model_type = getattr(hf_config, "model_type", None)
    name = architectures[0] if architectures else _BY_MODEL_TYPE.get(model_type)
    if name is None:
        raise ModelLoadError(
            f"the model config names no architecture and its model_type {model_type!r} is not one the built-in engine "
            f"knows; supported architectures: {', '.join(ARCHITECTURES)}"
        )
    if name not in ARCHITECTURES:
        raise ModelLoadError(
            f"architecture {name!r} is not supported by the built-in engine; supported: {', '.join(ARCHITECTURES)}"
            " (the vllm backend may run it)"
        )
    module, _, cls = ARCHITECTURES[name].partition(":")
    return getattr(import_module(module), cls)
