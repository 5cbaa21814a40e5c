"""BERT-family encoder for the pooling runner (all-MiniLM-L6-v2 and other `BertModel` checkpoints).

Like the decoder models it takes a flat token batch (no padding) whose sequences are marked by
`meta.cu_seqlens_q`, and attends bidirectionally within each sequence. It never binds a KV cache: an encoder sees
the whole prompt in one forward. A sequence is one segment (token type 0) unless `token_type_ids` mark a pair's second
text, as a cross-encoder's input does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vdeploy_engine.distributed.parallel import SINGLE, TPGroup
from vdeploy_engine.layers.attention import Attention, AttentionMetadata, HeadsPerRank
from vdeploy_engine.layers.linear import Linear


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, tp: TPGroup):
        super().__init__()
        head_dim = hidden // heads
        local = HeadsPerRank.split(heads, heads, tp)
        # query, key and value fused into one matmul
        shards = {"query": hidden, "key": hidden, "value": hidden}
        self.qkv_proj = Linear(hidden, 3 * hidden, bias=True, shards=shards, parallel="column", tp=tp)
        self.attn = Attention(local.num_heads, local.num_kv_heads, head_dim, scale=head_dim**-0.5, causal=False)
        self.attn_out = Linear(hidden, hidden, bias=True, parallel="row", tp=tp)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.up_proj = Linear(hidden, intermediate, bias=True, parallel="column", tp=tp)
        self.down_proj = Linear(intermediate, hidden, bias=True, parallel="row", tp=tp)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        x = self.attn_norm(x + self.attn_out(self.attn(q, k, v, meta)))  # post-norm, as in BERT
        return self.mlp_norm(x + self.down_proj(F.gelu(self.up_proj(x))))


class BertModel(nn.Module):
    """forward(input_ids [T], positions [T], meta) -> hidden states [T, hidden_size] of the last layer."""

    token_types = True  # forward takes a text pair's segment ids (a decoder reads a pair as one text)

    def __init__(self, hf_config, tp: TPGroup = SINGLE):
        super().__init__()
        if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"BertModel: position_embedding_type {hf_config.position_embedding_type!r} is not supported"
            )
        if hf_config.hidden_act != "gelu":
            raise ValueError(f"BertModel: hidden_act {hf_config.hidden_act!r} is not supported (only 'gelu')")
        hidden, eps = hf_config.hidden_size, hf_config.layer_norm_eps
        self.word_embeddings = nn.Embedding(hf_config.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(hf_config.max_position_embeddings, hidden)
        self.token_type_embeddings = nn.Embedding(hf_config.type_vocab_size, hidden)
        self.embed_norm = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList(
            BertLayer(hidden, hf_config.num_attention_heads, hf_config.intermediate_size, eps, tp)
            for _ in range(hf_config.num_hidden_layers)
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        segments = self.token_type_embeddings.weight[0] if token_type_ids is None else self.token_type_embeddings(
            token_type_ids
        )
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + segments
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, meta)
        return x

    def map_checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        """HF checkpoint tensor name (with or without the `bert.` prefix) -> (parameter name, shard of the fused
        qkv projection), or None for tensors an encoder does not use (position_ids, pooler, MLM/classifier heads)."""
        name = name.removeprefix("bert.")
        if name in _EMBEDDING_NAMES:
            return _EMBEDDING_NAMES[name], None
        if not name.startswith("encoder.layer."):
            return None
        index, rest = name.removeprefix("encoder.layer.").split(".", 1)
        module, kind = rest.rsplit(".", 1)
        if module.startswith("attention.self."):
            return f"layers.{index}.qkv_proj.{kind}", module.removeprefix("attention.self.")
        if module not in _LAYER_NAMES:
            return name, None  # the loader reports it as a tensor with no place in the model
        return f"layers.{index}.{_LAYER_NAMES[module]}.{kind}", None


_EMBEDDING_NAMES = {
    "embeddings.word_embeddings.weight": "word_embeddings.weight",
    "embeddings.position_embeddings.weight": "position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
}
_LAYER_NAMES = {
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up_proj",
    "output.dense": "down_proj",
    "output.LayerNorm": "mlp_norm",
}


class BertForSequenceClassification(BertModel):
    """A cross-encoder (ms-marco rerankers and the like): BERT, its pooler (tanh of a dense layer on the first token)
    and a linear classifier. `classify` turns each sequence's hidden states into its labels' logits."""

    def __init__(self, hf_config, tp: TPGroup = SINGLE):
        super().__init__(hf_config, tp)
        hidden = hf_config.hidden_size
        self.num_labels = hf_config.num_labels
        self.pooler = Linear(hidden, hidden, bias=True)
        self.classifier = Linear(hidden, self.num_labels, bias=True)

    def classify(self, hidden: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
        """hidden [T, H] of a flat batch -> logits [B, num_labels] from each sequence's first token."""
        first = hidden[cu_seqlens[:-1]]
        return self.classifier(torch.tanh(self.pooler(first)))

    def map_checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        if name.startswith("bert.pooler.dense."):
            return name.replace("bert.pooler.dense.", "pooler."), None
        if name.startswith("classifier."):
            return name, None
        return super().map_checkpoint_name(name)
