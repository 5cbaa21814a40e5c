"""Gemma 3 (text): five sliding-window layers to one global layer (`layer_types`), each type with its own rotary
base; q/k norms; a GeGLU MLP (tanh GELU); four norms a layer (before and after attention and MLP); embeddings scaled
by sqrt(hidden_size); logits soft-capped when the config sets `final_logit_softcapping`. Gemma's RMSNorm multiplies
by (1 + weight): the loader adds the 1 once, so the shared RMSNorm kernels run unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vdeploy_engine.distributed.parallel import SINGLE, TPGroup
from vdeploy_engine.layers.attention import AttentionMetadata
from vdeploy_engine.layers.embedding import VocabEmbedding
from vdeploy_engine.layers.linear import default_weight_loader
from vdeploy_engine.layers.norm import RMSNorm
from vdeploy_engine.layers.rotary import RotaryEmbedding
from vdeploy_engine.loader.errors import ModelLoadError
from vdeploy_engine.models.llama import LlamaForCausalLM, LlamaMLP, head_dim_of, sliding_windows
from vdeploy_engine.models.qwen3 import QKNormAttention

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


class GemmaRMSNorm(RMSNorm):
    """Checkpoints store w for a scale of (1 + w); the parameter holds 1 + w."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps)
        self.weight.weight_loader = _load_plus_one


def _load_plus_one(param: nn.Parameter, loaded: torch.Tensor) -> None:
    default_weight_loader(param, loaded.float() + 1.0)


class Gemma3Attention(QKNormAttention):
    norm_cls = GemmaRMSNorm

    def __init__(
        self, hf_config: Any, rotary: RotaryEmbedding, sliding_window: int | None, qkv_bias: bool, tp: TPGroup
    ):
        super().__init__(hf_config, rotary, sliding_window, qkv_bias, tp)
        self.attn.scale = hf_config.query_pre_attn_scalar**-0.5


class Gemma3MLP(LlamaMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, hf_config: Any, rotary: RotaryEmbedding, sliding_window: int | None, tp: TPGroup):
        super().__init__()
        self.self_attn = Gemma3Attention(hf_config, rotary, sliding_window, False, tp)
        self.mlp = Gemma3MLP(hf_config, tp)
        dim, eps = hf_config.hidden_size, hf_config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(dim, eps)
        self.post_attention_layernorm = GemmaRMSNorm(dim, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(dim, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(dim, eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it is added), as LlamaDecoderLayer does."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, meta))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


def _rope_for(hf_config: Any, layer_type: str) -> dict[str, Any]:
    """The rotary settings of one layer type: transformers 5 keys `rope_parameters` by layer type."""
    params = dict(hf_config.rope_parameters[layer_type])
    params["rope_type"] = params.get("rope_type") or "default"
    return params


class Gemma3Model(nn.Module):
    def __init__(self, hf_config: Any, qkv_bias: bool, tp: TPGroup):
        super().__init__()
        _check_supported(hf_config)
        self.embed_tokens = VocabEmbedding(hf_config.vocab_size, hf_config.hidden_size, tp)
        self.embed_scale = math.sqrt(hf_config.hidden_size)
        layer_types = hf_config.layer_types
        rotaries = {
            kind: RotaryEmbedding(head_dim_of(hf_config), hf_config.max_position_embeddings, _rope_for(hf_config, kind))
            for kind in sorted(set(layer_types))
        }
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(hf_config, rotaries[kind], window, tp)
            for kind, window in zip(layer_types, sliding_windows(hf_config), strict=True)
        )
        self.norm = GemmaRMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        # Scaled in the model dtype, as transformers does (sqrt(640) rounds in bfloat16).
        hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


def _check_supported(hf_config: Any) -> None:
    if getattr(hf_config, "attn_logit_softcapping", None) is not None:
        raise ModelLoadError("Gemma 3: attn_logit_softcapping is not supported by the built-in attention kernels")
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise ModelLoadError("Gemma 3: use_bidirectional_attention (embedding variants) is not supported")
    activation = getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act
    if activation not in _GELU_TANH:
        raise ModelLoadError(f"Gemma 3: hidden_activation {activation!r} is not supported (gelu_pytorch_tanh)")


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3 text checkpoints (270M, 1B; the text tower of larger ones as Gemma3ForCausalLM)."""

    model_cls = Gemma3Model

    def __init__(self, hf_config: Any, tp: TPGroup = SINGLE):
        super().__init__(hf_config, tp)
        self.softcap = getattr(hf_config, "final_logit_softcapping", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
