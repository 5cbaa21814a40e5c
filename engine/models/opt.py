"""OPT (facebook/opt-*): learned positions offset by 2, pre- or post-LayerNorm blocks, ReLU MLP, biases everywhere,
an optional projection between a narrower embedding and the hidden size, and an LM head tied to the embedding."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vdeploy_engine.distributed.parallel import SINGLE, WHOLE, Stage, TPGroup
from vdeploy_engine.layers.attention import Attention, AttentionMetadata, HeadsPerRank
from vdeploy_engine.layers.embedding import LMHead, VocabEmbedding
from vdeploy_engine.layers.linear import Linear
from vdeploy_engine.loader.errors import ModelLoadError

# OPT's learned position table starts two rows in (a fairseq legacy: rows 0-1 were reserved for padding).
POSITION_OFFSET = 2
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class OPTAttention(nn.Module):
    def __init__(self, hf_config: Any, tp: TPGroup):
        super().__init__()
        dim, heads, bias = hf_config.hidden_size, hf_config.num_attention_heads, hf_config.enable_bias
        local = HeadsPerRank.split(heads, heads, tp)
        self.qkv_proj = Linear(dim, 3 * dim, bias, {"q": dim, "k": dim, "v": dim}, parallel="column", tp=tp)
        self.out_proj = Linear(dim, dim, bias, parallel="row", tp=tp)
        self.attn = Attention(local.num_heads, local.num_kv_heads, dim // heads, (dim // heads) ** -0.5)

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).chunk(3, dim=-1)
        return self.out_proj(self.attn(q, k, v, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, hf_config: Any, tp: TPGroup):
        super().__init__()
        dim, affine = hf_config.hidden_size, hf_config.layer_norm_elementwise_affine
        self.pre_norm = hf_config.do_layer_norm_before
        self.self_attn = OPTAttention(hf_config, tp)
        self.self_attn_layer_norm = nn.LayerNorm(dim, elementwise_affine=affine)
        self.fc1 = Linear(dim, hf_config.ffn_dim, hf_config.enable_bias, parallel="column", tp=tp)
        self.fc2 = Linear(hf_config.ffn_dim, dim, hf_config.enable_bias, parallel="row", tp=tp)
        self.final_layer_norm = nn.LayerNorm(dim, elementwise_affine=affine)
        if hf_config.activation_function not in _ACTIVATIONS:
            raise ModelLoadError(
                f"OPT activation_function {hf_config.activation_function!r} is not supported "
                f"(supported: {', '.join(_ACTIVATIONS)})"
            )
        self.activation = _ACTIVATIONS[hf_config.activation_function]

    def _block(self, x: torch.Tensor, norm: nn.LayerNorm, body: Any) -> torch.Tensor:
        """Residual around `body`, with the norm before it (most OPT sizes) or after the add (opt-350m)."""
        out = x + body(norm(x) if self.pre_norm else x)
        return out if self.pre_norm else norm(out)

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self._block(hidden, self.self_attn_layer_norm, lambda h: self.self_attn(h, meta))
        return self._block(hidden, self.final_layer_norm, lambda h: self.fc2(self.activation(self.fc1(h))))


class OPTDecoder(nn.Module):
    """On a pipeline stage: the stage's layers (placeholders keep the others' numbers); the first stage embeds tokens
    and positions, the last normalises and projects out."""

    def __init__(self, hf_config: Any, tp: TPGroup, stage: Stage):
        super().__init__()
        dim, embed_dim = hf_config.hidden_size, hf_config.word_embed_proj_dim
        first, last, self.held = stage.is_first, stage.is_last, stage.layers(hf_config.num_hidden_layers)
        self.embed_tokens = VocabEmbedding(hf_config.vocab_size, embed_dim, tp) if first else None
        self.embed_positions = VocabEmbedding(hf_config.max_position_embeddings + POSITION_OFFSET, dim) if first else None
        self.project_in = Linear(embed_dim, dim) if embed_dim != dim and first else None
        self.project_out = Linear(dim, embed_dim) if embed_dim != dim and last else None
        self.layers = nn.ModuleList(OPTDecoderLayer(hf_config, tp) if i in self.held else nn.Identity()
                                    for i in range(hf_config.num_hidden_layers))
        keep_final_norm = hf_config.do_layer_norm_before and not getattr(hf_config, "_remove_final_layer_norm", False)
        self.final_layer_norm = (
            nn.LayerNorm(dim, elementwise_affine=hf_config.layer_norm_elementwise_affine)
            if keep_final_norm and last else None
        )
        self.is_last = last
        self.held_layers = list(self.layers)[self.held.start : self.held.stop]  # a plain list: not registered twice

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        carried: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states; on a stage other than the first, from `carried` ([1, T, hidden], the previous stage's
        output), and on a stage other than the last, that output."""
        if carried is None:
            hidden = self.embed_tokens(input_ids)
            if self.project_in is not None:
                hidden = self.project_in(hidden)
            hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        else:
            hidden = carried[0]
        for layer in self.held_layers:
            hidden = layer(hidden, meta)
        if not self.is_last:
            return hidden.unsqueeze(0)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class OPTModel(nn.Module):
    def __init__(self, hf_config: Any, tp: TPGroup, stage: Stage):
        super().__init__()
        self.decoder = OPTDecoder(hf_config, tp, stage)


class OPTForCausalLM(nn.Module):
    carries = 1  # [T, hidden] tensors a pipeline stage passes to the next

    def __init__(self, hf_config: Any, tp: TPGroup = SINGLE, stage: Stage = WHOLE):
        super().__init__()
        self.config = hf_config
        self.model = OPTModel(hf_config, tp, stage)
        # The head is tied to the token embedding; on a later stage than the embedding it is a copy of its tensor.
        self.head_from_embedding = not stage.is_first
        embed = self.model.decoder.embed_tokens
        self.lm_head = LMHead(hf_config.vocab_size, hf_config.word_embed_proj_dim, embed, tp) if stage.is_last else None
        decoder = "model.decoder."
        self.absent_prefixes = stage.absent(
            hf_config.num_hidden_layers, decoder + "layers.",
            first=tuple(decoder + part for part in ("embed_tokens.", "embed_positions.", "project_in.")),
            last=(decoder + "final_layer_norm.", decoder + "project_out."),
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        carried: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids/positions [T] -> hidden states [T, word_embed_proj_dim] (a pipeline stage: see OPTDecoder)."""
        return self.model.decoder(input_ids, positions, meta, carried)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def map_checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        """HF checkpoint name -> (parameter name, shard). facebook/opt-* checkpoints omit the `model.` prefix."""
        if name.startswith("lm_head."):  # always tied to the token embedding
            return None
        if name.startswith("decoder."):
            name = "model." + name
        if self.head_from_embedding and name == "model.decoder.embed_tokens.weight":
            return "lm_head.weight", None
        for shard in ("q", "k", "v"):
            if f".self_attn.{shard}_proj." in name:
                return name.replace(f".{shard}_proj.", ".qkv_proj."), shard
        return name, None
