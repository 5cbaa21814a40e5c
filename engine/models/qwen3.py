"""Qwen3 (dense): a Llama whose attention normalises each query and key head (RMSNorm over head_dim) before rotary.

The fused small-batch path of the llama family stays: the per-head norms run in LlamaAttention.heads, between the
fused q/k/v projection and the attention kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from vdeploy_engine.distributed.parallel import TPGroup
from vdeploy_engine.layers.norm import RMSNorm
from vdeploy_engine.layers.rotary import RotaryEmbedding
from vdeploy_engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class QKNormAttention(LlamaAttention):
    """Attention with an RMSNorm over each head of q and of k (one weight of head_dim shared by the heads)."""

    norm_cls = RMSNorm

    def __init__(
        self, hf_config: Any, rotary: RotaryEmbedding, sliding_window: int | None, qkv_bias: bool, tp: TPGroup
    ):
        super().__init__(hf_config, rotary, sliding_window, qkv_bias, tp)
        self.q_norm = self.norm_cls(self.head_dim, hf_config.rms_norm_eps)
        self.k_norm = self.norm_cls(self.head_dim, hf_config.rms_norm_eps)

    def heads(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = super().heads(q, k)
        return self.q_norm(q), self.k_norm(k)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = QKNormAttention


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 dense checkpoints (0.6B ... 32B): no q/k/v biases, q/k norms."""

    model_cls = Qwen3Model
