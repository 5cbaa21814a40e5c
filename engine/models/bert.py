"""BERT-family encoder for the pooling runner (all-MiniLM-L6-v2 and other `BertModel` checkpoints).

Like the decoder models it takes a flat token batch (no padding) whose sequences are marked by
`meta.cu_seqlens_q`, and attends bidirectionally within each sequence. It never binds a KV cache: an encoder sees
the whole prompt in one forward. Every sequence is a single segment (token type 0).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.attention import Attention, AttentionMetadata


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.hidden = hidden
        head_dim = hidden // heads
        self.qkv_proj = nn.Linear(hidden, 3 * hidden)  # query, key, value fused into one matmul
        self.attn = Attention(heads, heads, head_dim, scale=head_dim**-0.5, causal=False)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.up_proj = nn.Linear(hidden, intermediate)
        self.down_proj = nn.Linear(intermediate, hidden)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.hidden, dim=-1)
        x = self.attn_norm(x + self.attn_out(self.attn(q, k, v, meta)))  # post-norm, as in BERT
        return self.mlp_norm(x + self.down_proj(F.gelu(self.up_proj(x))))


class BertModel(nn.Module):
    """forward(input_ids [T], positions [T], meta) -> hidden states [T, hidden_size] of the last layer."""

    def __init__(self, hf_config):
        super().__init__()
        if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"BertModel: position_embedding_type {hf_config.position_embedding_type!r} is not supported")
        if hf_config.hidden_act != "gelu":
            raise ValueError(f"BertModel: hidden_act {hf_config.hidden_act!r} is not supported (only 'gelu')")
        hidden, eps = hf_config.hidden_size, hf_config.layer_norm_eps
        self.word_embeddings = nn.Embedding(hf_config.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(hf_config.max_position_embeddings, hidden)
        self.token_type_embeddings = nn.Embedding(hf_config.type_vocab_size, hidden)
        self.embed_norm = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList(
            BertLayer(hidden, hf_config.num_attention_heads, hf_config.intermediate_size, eps)
            for _ in range(hf_config.num_hidden_layers)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, meta)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads HF checkpoint tensors (names with or without the `bert.` prefix); heads a checkpoint may carry
        (pooler, MLM, classifier) are skipped. Raises ValueError naming any parameter left unloaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = _param_name(name.removeprefix("bert."))
            if target is None:
                continue
            param_name, qkv_index = target
            param = params[param_name]
            with torch.no_grad():
                if qkv_index is None:
                    param.copy_(tensor)
                else:  # one third of the fused qkv projection
                    param.narrow(0, qkv_index * param.shape[0] // 3, param.shape[0] // 3).copy_(tensor)
            loaded.add(f"{param_name}#{qkv_index}")
        expected = {f"{n}#{i}" for n in params for i in ((0, 1, 2) if ".qkv_proj." in n else (None,))}
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"BertModel: checkpoint lacks {len(missing)} tensors, e.g. {missing[0].split('#')[0]}")


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
_QKV_INDEX = {"query": 0, "key": 1, "value": 2}


def _param_name(checkpoint_name: str) -> tuple[str, int | None] | None:
    """Maps an HF BERT tensor name to (our parameter, index into the fused qkv or None); None for tensors we skip."""
    if checkpoint_name in _EMBEDDING_NAMES:
        return _EMBEDDING_NAMES[checkpoint_name], None
    if not checkpoint_name.startswith("encoder.layer."):
        return None  # position_ids buffer, pooler, MLM / classification heads
    index, rest = checkpoint_name.removeprefix("encoder.layer.").split(".", 1)
    module, kind = rest.rsplit(".", 1)
    if module.startswith("attention.self."):
        return f"layers.{index}.qkv_proj.{kind}", _QKV_INDEX[module.removeprefix("attention.self.")]
    return f"layers.{index}.{_LAYER_NAMES[module]}.{kind}", None
