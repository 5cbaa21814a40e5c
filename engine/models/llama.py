"""The llama family: Llama, Mistral (sliding window), Qwen2 (q/k/v biases), SmolLM2 (a Llama with tied embeddings).

q/k/v and gate/up are each one fused matmul; a step of one or two tokens on the GPU takes a path of four launches per
layer besides the attention's (LlamaModel.fuses). `map_checkpoint_name` is the single place that says where an HF
checkpoint tensor goes, so a tensor-parallel loader can shard at load time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vdeploy_engine.distributed.parallel import SINGLE, WHOLE, Stage, TPGroup
from vdeploy_engine.layers.attention import Attention, AttentionMetadata, HeadsPerRank
from vdeploy_engine.layers.embedding import LMHead, VocabEmbedding
from vdeploy_engine.layers.linear import Linear, UnquantizedMethod
from vdeploy_engine.layers.norm import RMSNorm
from vdeploy_engine.layers.rotary import RotaryEmbedding, rope_parameters
from vdeploy_kernels import ops

# The most tokens a step may have to take the fused path. Measured on an H200 (bench/results/kernels-h200.json): at 1-2
# rows the fused matrix-vector kernels beat the unfused path on every Qwen2.5-0.5B projection; at 4 rows cuBLAS wins
# gate/up and down by 1.2-1.7x.
FUSED_MAX_TOKENS = 2

# Checkpoint projection name -> (fused module, shard).
_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


def head_dim_of(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def sliding_windows(hf_config: Any) -> list[int | None]:
    """Per-layer sliding window: transformers 5 lists `layer_types`; older configs set `sliding_window` for all
    layers (Mistral) or gate it with `use_sliding_window` (Qwen2)."""
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    if not getattr(hf_config, "use_sliding_window", True):
        window = None
    return [window] * hf_config.num_hidden_layers


class LlamaAttention(nn.Module):
    def __init__(
        self, hf_config: Any, rotary: RotaryEmbedding, sliding_window: int | None, qkv_bias: bool, tp: TPGroup
    ):
        super().__init__()
        self.head_dim = head_dim = head_dim_of(hf_config)
        total_heads, total_kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
        local = HeadsPerRank.split(total_heads, total_kv_heads, tp)
        self.num_heads, self.num_kv_heads = local.num_heads, local.num_kv_heads
        q_size, kv_size = total_heads * head_dim, total_kv_heads * head_dim
        o_bias = getattr(hf_config, "attention_bias", False)
        self.qkv_proj = Linear(
            hf_config.hidden_size, q_size + 2 * kv_size, qkv_bias or o_bias, {"q": q_size, "k": kv_size, "v": kv_size},
            parallel="column", tp=tp, replicas={"k": local.kv_replicas, "v": local.kv_replicas},
        )
        self.o_proj = Linear(q_size, hf_config.hidden_size, o_bias, parallel="row", tp=tp)
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5, sliding_window)
        self.splits = list(self.qkv_proj.shards_local.values())

    def heads(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H*D], k [T, Hkv*D] as projected -> [T, H, D], [T, Hkv, D] before rotary (Qwen3 and Gemma 3 normalise
        each head here)."""
        return q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.splits, dim=-1)
        q, k = self.rotary(positions, *self.heads(q, k))
        return self.o_proj(self.attn(q.flatten(1), k.flatten(1), v, meta))

    def forward_fused(
        self, positions: torch.Tensor, hidden: torch.Tensor, norm: RMSNorm, meta: AttentionMetadata
    ) -> torch.Tensor:
        """hidden + attention(norm(hidden)) in two launches and the attention's: the norm runs inside the q/k/v
        projection, rotary and the KV-cache write inside the attention (a decode step's) or beside it, the residual add
        inside the output projection."""
        qkv = ops.fused_linear(
            hidden, self.qkv_proj.weight, self.qkv_proj.bias, norm_weight=norm.weight, eps=norm.eps
        )
        q, k, v = qkv.split(self.splits, dim=-1)
        q, k = self.heads(q, k)
        attn = self.attn.attend_unrotated(q, k, v.view(k.shape), positions, self.rotary, meta)
        return self.o_proj.fused_with_residual(attn, hidden)


class LlamaMLP(nn.Module):
    def __init__(self, hf_config: Any, tp: TPGroup):
        super().__init__()
        hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
        bias = getattr(hf_config, "mlp_bias", False)
        self.gate_up_proj = Linear(hidden, 2 * inter, bias, {"gate": inter, "up": inter}, parallel="column", tp=tp)
        self.down_proj = Linear(inter, hidden, bias, parallel="row", tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))

    def forward_fused(self, hidden: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """hidden + mlp(norm(hidden)) in two launches: the norm inside gate/up, SiLU-and-mul and the residual add
        inside down."""
        gate_up = ops.fused_linear(
            hidden, self.gate_up_proj.weight, self.gate_up_proj.bias, norm_weight=norm.weight, eps=norm.eps
        )
        return self.down_proj.fused_with_residual(gate_up, hidden, gate_up=True)


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention  # subclasses swap in their own (Qwen3: q/k norms)

    def __init__(
        self, hf_config: Any, rotary: RotaryEmbedding, sliding_window: int | None, qkv_bias: bool, tp: TPGroup,
        index: int = 0,
    ):
        super().__init__()
        self.self_attn = self.attention_cls(hf_config, rotary, sliding_window, qkv_bias, tp)
        self.mlp = self.make_mlp(hf_config, tp, index)
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def make_mlp(self, hf_config: Any, tp: TPGroup, index: int) -> nn.Module:
        """The MLP of layer `index` (mixture-of-experts models pick experts or a dense MLP by layer)."""
        return LlamaMLP(hf_config, tp)

    def forward_fused(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The same layer for a few tokens, as four launches and the attention's over the residual stream (see
        LlamaModel.forward)."""
        hidden = self.self_attn.forward_fused(positions, hidden, self.input_layernorm, meta)
        return self.mlp.forward_fused(hidden, self.post_attention_layernorm)


class LlamaModel(nn.Module):
    """On a pipeline stage, only the stage's layers are built (the others are placeholders, so that parameter names
    keep the checkpoint's layer numbers); the first stage embeds, the last normalises."""

    layer_cls = LlamaDecoderLayer

    def __init__(self, hf_config: Any, qkv_bias: bool, tp: TPGroup, stage: Stage = WHOLE):
        super().__init__()
        self.stage = stage
        self.held = stage.layers(hf_config.num_hidden_layers)
        self.embed_tokens = VocabEmbedding(hf_config.vocab_size, hf_config.hidden_size, tp) if stage.is_first else None
        # One cos/sin cache, shared by every layer.
        rotary = RotaryEmbedding(head_dim_of(hf_config), hf_config.max_position_embeddings, rope_parameters(hf_config))
        self.layers = nn.ModuleList(
            self.layer_cls(hf_config, rotary, window, qkv_bias, tp, index) if index in self.held else nn.Identity()
            for index, window in enumerate(sliding_windows(hf_config))
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps) if stage.is_last else None
        self.held_layers = list(self.layers)[self.held.start : self.held.stop]  # a plain list: not registered twice

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        carried: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states; on a stage other than the first, from `carried`, the previous stage's output (hidden and
        residual stacked, [2, T, hidden]), and on a stage other than the last, that output."""
        if carried is None:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = carried
        if self.fuses(hidden):
            for layer in self.layers:
                hidden = layer.forward_fused(positions, hidden, meta)
            return self.norm(hidden)
        for layer in self.held_layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        if not self.stage.is_last:
            return torch.stack((hidden, residual))
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def fuses(self, hidden: torch.Tensor) -> bool:
        """A batch of a few tokens on the GPU is bound by kernel launches and weight reads, not arithmetic: it takes
        the fused path (matrix-vector kernels with the norms, activation and residual adds folded in). Needs a bound
        KV cache (profiling runs have none), plain weights and the whole model (no pipeline stages)."""
        first = self.layers[0]
        return (
            hidden.is_cuda
            and self.stage.size == 1
            and len(hidden) <= FUSED_MAX_TOKENS
            and first.self_attn.attn.k_cache is not None
            and isinstance(first.self_attn.qkv_proj.quant_method, UnquantizedMethod)
        )


class LlamaForCausalLM(nn.Module):
    """Llama, Mistral and SmolLM2 checkpoints."""

    qkv_bias = False
    model_cls = LlamaModel
    generates = True  # has an LM head (a sequence classifier has a score head instead)
    carries = 2  # [T, hidden] tensors a pipeline stage passes to the next: hidden states and the residual

    def __init__(self, hf_config: Any, tp: TPGroup = SINGLE, stage: Stage = WHOLE):
        super().__init__()
        self.config = hf_config
        self.model = self.model_cls(hf_config, self.qkv_bias, tp, *([stage] if stage.size > 1 else []))
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        # A tied head on a later stage than the embedding has its own copy, loaded from the embedding's tensor.
        self.head_from_embedding = self.tie_word_embeddings and not stage.is_first
        tied = self.model.embed_tokens if self.tie_word_embeddings and stage.is_first else None
        self.lm_head = (
            LMHead(hf_config.vocab_size, hf_config.hidden_size, tied, tp) if stage.is_last and self.generates else None
        )
        self.absent_prefixes = stage.absent(hf_config.num_hidden_layers, "model.layers.", first=("model.embed_tokens.",),
                                            last=("model.norm.", "lm_head."))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        carried: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids/positions [T] -> hidden states [T, hidden] (a pipeline stage: see LlamaModel.forward)."""
        if carried is None:  # models that are never split (Gemma 3) take no `carried`
            return self.model(input_ids, positions, meta)
        return self.model(input_ids, positions, meta, carried)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (the rows to sample from) -> logits [N, vocab]."""
        return self.lm_head(hidden)

    def map_checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        """HF checkpoint tensor name -> (parameter name, shard of a fused layer), or None to skip the tensor."""
        if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name.startswith("lm_head.")):
            return None
        if self.head_from_embedding and name == "model.embed_tokens.weight":
            return "lm_head.weight", None
        for checkpoint, (fused, shard) in _FUSED.items():
            if f".{checkpoint}." in name:
                return name.replace(f".{checkpoint}.", f".{fused}."), shard
        return name, None


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5: a Llama with biases on the q/k/v projections."""

    qkv_bias = True


class LlamaForSequenceClassification(LlamaForCausalLM):
    """A decoder scoring whole sequences (reward models, decoder rerankers: transformers' *ForSequenceClassification):
    a linear `score` head on each sequence's last token instead of the LM head. Served by the pooling runner."""

    generates = False

    def __init__(self, hf_config: Any, tp: TPGroup = SINGLE):
        super().__init__(hf_config, tp)
        self.score = Linear(hf_config.hidden_size, hf_config.num_labels, bias=False)

    def classify(self, hidden: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
        """hidden [T, H] of a flat batch -> logits [B, num_labels] from each sequence's last token."""
        return self.score(hidden[[end - 1 for end in cu_seqlens[1:]]])


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    qkv_bias = True
