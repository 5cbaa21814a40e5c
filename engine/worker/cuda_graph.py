"""CUDA graphs for decode steps: one graph per bucketed batch size, captured once at start-up, replayed every step.

A decode step launches a few hundred small kernels; on a host with a slow CPU the launches, not the GPU, set the pace.
Replaying a captured graph costs one launch. Graphs read their inputs from fixed addresses, so every decode step
copies its inputs into persistent buffers first (rows past the real batch are padding: they write no KV, slot -1, and
attend over one cached token; their outputs are ignored).
"""

from __future__ import annotations

import logging

import torch

from engine.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (padding wastes at most 15 rows)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes) | {max_num_seqs})


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_blocks_per_seq: int, hidden_size: int):
        device, dtype = torch.device("cuda"), next(model.parameters()).dtype
        self.model = model
        self.input_ids = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_num_seqs,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(max_num_seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(max_num_seqs, hidden_size, dtype=dtype, device=device)
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.memory_bytes = 0

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures the largest batch first so smaller graphs reuse its memory pool."""
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        pool = None
        for size in reversed(self.sizes):
            meta = self._meta(size)
            self._forward(size, meta)  # warm-up: Triton compiles and autotunes outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size, meta)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.memory_bytes = torch.cuda.memory_reserved() - before
        logger.info(
            "CUDA graphs: %d decode batch sizes (1..%d) captured, %.1f MiB",
            len(self.sizes),
            self.sizes[-1],
            self.memory_bytes / (1 << 20),
        )

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step of `len(input_ids)` sequences; inputs may live on the host. Returns their hidden states."""
        batch, width = block_tables.shape
        size = next(s for s in self.sizes if s >= batch)
        self.input_ids[:batch].copy_(input_ids, non_blocking=True)
        self.positions[:batch].copy_(positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(slot_mapping, non_blocking=True)
        self.seq_lens[:batch].copy_(seq_lens, non_blocking=True)
        self.block_tables[:batch, :width].copy_(block_tables, non_blocking=True)
        if size > batch:  # padding rows: store nothing, attend over one token of block 0
            self.slot_mapping[batch:size].fill_(-1)
            self.seq_lens[batch:size].fill_(1)
        self.graphs[size].replay()
        return self.hidden[:batch]

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping[:size], self.seq_lens[:size], self.block_tables[:size])

    def _forward(self, size: int, meta: AttentionMetadata) -> None:
        self.hidden[:size] = self.model(self.input_ids[:size], self.positions[:size], meta)
