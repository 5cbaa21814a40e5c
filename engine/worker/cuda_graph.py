"""CUDA graphs for decode steps: one graph per bucketed batch size, captured once at start-up, replayed every step.

A decode step launches a few hundred small kernels; on a host with a slow CPU the launches, not the GPU, set the pace.
Replaying a captured graph costs one launch. A graph holds the whole step up to the next token: the forward pass, the
LM head and the greedy argmax, so a greedy batch needs nothing else launched (other sampling reads the logits).
Graphs read their inputs from fixed addresses: the model runner's persistent decode buffers. Rows past the real batch
are padding: they store no KV (slot -1) and attend over one cached token; their outputs are ignored.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from vdeploy_engine.config import graph_batch_sizes
from vdeploy_engine.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


class DecodeInputs(Protocol):
    input_ids: torch.Tensor  # [max_num_seqs]
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor  # [max_num_seqs, max_blocks_per_seq]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, inputs: DecodeInputs, max_num_seqs: int):
        self.model = model
        self.inputs = inputs
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Graph outputs for the largest size; a replay of size s fills the first s rows.
        self.logits: torch.Tensor | None = None  # [rows, vocab]
        self.tokens: torch.Tensor | None = None  # [rows] greedy argmax of the logits
        self.memory_bytes = 0

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def padded(self, batch: int) -> int:
        """The captured size a batch of `batch` sequences replays."""
        return next(s for s in self.sizes if s >= batch)

    def _step(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.inputs
        meta = AttentionMetadata(x.slot_mapping[:size], x.seq_lens[:size], x.block_tables[:size])
        logits = self.model.compute_logits(self.model(x.input_ids[:size], x.positions[:size], meta))
        return logits, logits.argmax(dim=-1)

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures the largest batch first so that smaller graphs reuse its memory pool."""
        x = self.inputs
        x.slot_mapping.fill_(-1)
        x.seq_lens.fill_(1)
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        pool = None
        for size in reversed(self.sizes):
            logits, tokens = self._step(size)  # warm-up outside the capture
            if self.logits is None:
                self.logits, self.tokens = torch.empty_like(logits), torch.empty_like(tokens)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits, tokens = self._step(size)
                self.logits[:size], self.tokens[:size] = logits, tokens
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.memory_bytes = torch.cuda.memory_reserved() - before
        logger.info(
            "CUDA graphs: %d decode batch sizes (1..%d) captured in %.1f MiB",
            len(self.sizes),
            self.max_batch,
            self.memory_bytes / (1 << 20),
        )

    def replay(self, batch: int) -> torch.Tensor:
        """Runs the decode step whose inputs fill the first `padded(batch)` rows of the buffers (the padding rows
        already set by the caller); returns its logits, and leaves its greedy tokens in `tokens[:batch]`."""
        self.graphs[self.padded(batch)].replay()
        return self.logits[:batch]
