"""The attention layer every model uses, and the per-step metadata the model runner builds for it.

A model never sees the scheduler: it gets a flat token batch, positions and an AttentionMetadata, and each Attention
layer writes this step's keys and values into its slice of the paged KV cache (bound by the model runner as
`k_cache`/`v_cache`), then attends over the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from vdeploy_kernels import ops

if TYPE_CHECKING:
    from vdeploy_engine.distributed.parallel import TPGroup
    from vdeploy_engine.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class HeadsPerRank:
    """A tensor-parallel rank's share of the attention heads. With fewer KV heads than ranks each rank keeps one KV
    head, held by `kv_replicas` consecutive ranks (as vLLM does)."""

    num_heads: int
    num_kv_heads: int
    kv_replicas: int

    @classmethod
    def split(cls, num_heads: int, num_kv_heads: int, tp: TPGroup) -> HeadsPerRank:
        heads = tp.split(num_heads, "num_attention_heads")
        if num_kv_heads >= tp.size:
            return cls(heads, tp.split(num_kv_heads, "num_key_value_heads"), 1)
        if tp.size % num_kv_heads:
            raise ValueError(
                f"the tensor-parallel size {tp.size} is not a multiple of num_key_value_heads ({num_kv_heads})"
            )
        return cls(heads, 1, tp.size // num_kv_heads)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: where each token's K/V goes in the cache; -1 = not stored
    seq_lens: torch.Tensor  # [B] int32: context length per sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    # [B+1] int32 query offsets into the flat batch. None for a decode-only batch (exactly one query per sequence),
    # which takes the decode kernel and can be captured in a CUDA graph.
    cu_seqlens_q: torch.Tensor | None = None

    @property
    def is_decode(self) -> bool:
        return self.cu_seqlens_q is None

    def to(self, device: torch.device) -> AttentionMetadata:
        return AttentionMetadata(
            *(None if t is None else t.to(device) for t in (
                self.slot_mapping, self.seq_lens, self.block_tables, self.cu_seqlens_q))
        )


class Attention(nn.Module):
    """Multi-head / grouped-query attention over the paged KV cache. Heads are this rank's heads."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        causal: bool = True,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.sliding_window, self.causal = scale, sliding_window, causal
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H*D], k/v [T, Hkv*D] -> [T, H*D]."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.k_cache is None:  # no cache bound (profiling run): attend within the batch
            out = ops.varlen_attention(q, k, v, meta.cu_seqlens_q, self.scale, self.causal, self.sliding_window)
            return out.flatten(1)
        ops.write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.attend_cached(q, meta)

    def attend_unrotated(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, H, D] and k/v [T, Hkv, D] as projected: rotates q and k, stores k and v in the cache and attends ->
        [T, H*D]. A decode batch does all of it in the decode kernel, other batches in two launches."""
        cache = (self.k_cache, self.v_cache, meta.slot_mapping)
        if meta.is_decode:
            out = ops.rotary_decode_attention(
                q, k, v, positions, rotary.cos_sin_cache, *cache, meta.block_tables, meta.seq_lens, self.scale,
                self.sliding_window, rotary.is_neox,
            )
            return out.flatten(1)
        q = ops.rotary_and_cache(q, k, v, positions, rotary.cos_sin_cache, *cache, rotary.is_neox)
        return self.attend_cached(q, meta)

    def attend_cached(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D] attends over the cache, which already holds this step's keys and values -> [T, H*D]."""
        if meta.is_decode:
            out = ops.paged_decode_attention(
                q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens, self.scale, self.sliding_window
            )
        else:
            out = ops.paged_prefill_attention(
                q,
                self.k_cache,
                self.v_cache,
                meta.block_tables,
                meta.cu_seqlens_q,
                meta.seq_lens,
                self.scale,
                self.sliding_window,
            )
        return out.flatten(1)
