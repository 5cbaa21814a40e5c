"""Loading an engine model and its transformers reference, and driving the engine model the way the model runner
does: flat token batches with AttentionMetadata, either with no KV cache (sequences marked by cu_seqlens_q) or over a
real paged cache with prefill followed by decode steps."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import nn

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.layers.attention import Attention, AttentionMetadata
from vdeploy_engine.loader import load_hf_config, load_model


def load_engine_model(path: Path | str, dtype: str = "float32", device: str = "cpu") -> nn.Module:
    config = EngineConfig(model=str(path), dtype=dtype, device=device)
    return load_model(config, load_hf_config(config))


def reference_logits(path: Path | str, sequences: list[list[int]], **kwargs) -> list[torch.Tensor]:
    """transformers' logits for each sequence on its own, float32."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return [ref(torch.tensor([s])).logits[0] for s in sequences]


def _cu_seqlens(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def forward_no_cache(model: nn.Module, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Every position's logits for each sequence, run as one flat batch."""
    device = _device(model)
    lengths = [len(s) for s in sequences]
    ids = torch.tensor([t for s in sequences for t in s], device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    meta = AttentionMetadata(
        slot_mapping=torch.full((len(ids),), -1, dtype=torch.int64, device=device),
        seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
        block_tables=torch.zeros(len(lengths), 1, dtype=torch.int32, device=device),
        cu_seqlens_q=_cu_seqlens(lengths, device),
    )
    with torch.no_grad():
        logits = model.compute_logits(model(ids, positions, meta))
    return list(logits.split(lengths))


class PagedRun:
    """Binds a paged KV cache to every Attention layer and steps sequences through prefill and decode. Blocks are
    handed out in a scrambled order so a wrong block-table lookup cannot pass by luck."""

    def __init__(self, model: nn.Module, num_seqs: int, max_len: int, block_size: int = 4):
        self.model, self.block_size, self.device = model, block_size, _device(model)
        blocks_per_seq = -(-max_len // block_size)
        order = torch.randperm(num_seqs * blocks_per_seq, generator=torch.Generator().manual_seed(0))
        self.block_tables = order.view(num_seqs, blocks_per_seq).to(torch.int32)
        self.seq_lens = [0] * num_seqs
        dtype = next(model.parameters()).dtype
        for layer in model.modules():
            if isinstance(layer, Attention):
                shape = (num_seqs * blocks_per_seq, block_size, layer.num_kv_heads, layer.head_dim)
                layer.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
                layer.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)

    def _slot(self, seq: int, pos: int) -> int:
        return int(self.block_tables[seq, pos // self.block_size]) * self.block_size + pos % self.block_size

    def step(self, chunks: list[list[int]], decode: bool = False) -> torch.Tensor:
        """Feeds chunks[i] to sequence i (a prefill chunk, or one token each when `decode`); returns the logits of
        each sequence's last fed token, [num_seqs, vocab]."""
        ids, positions, slots = [], [], []
        for seq, chunk in enumerate(chunks):
            start = self.seq_lens[seq]
            ids += chunk
            positions += range(start, start + len(chunk))
            slots += [self._slot(seq, p) for p in range(start, start + len(chunk))]
            self.seq_lens[seq] += len(chunk)
        lengths = [len(c) for c in chunks]
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32, device=device),
            block_tables=self.block_tables.to(device),
            cu_seqlens_q=None if decode else _cu_seqlens(lengths, device),
        )
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta)
            last = torch.tensor(lengths, device=device).cumsum(0) - 1
            return self.model.compute_logits(hidden[last])
