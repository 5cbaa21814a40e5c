"""Token embedding and the LM head that may share its weight (tied embeddings), both vocab-parallel under tensor
parallelism: rank r holds rows [r * per_rank, (r + 1) * per_rank) of the vocabulary (the last rank's tail is zero
padding). A lookup zeroes the ids other ranks hold and sums over the ranks; the head gathers every rank's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vdeploy_engine.distributed.parallel import SINGLE, TPGroup
from vdeploy_engine.layers.linear import WeightShapeError, dense_linear, onednn_pack, onednn_packs


def vocab_rows(vocab_size: int, dim: int, tp: TPGroup) -> nn.Parameter:
    """This rank's rows of a [vocab_size, dim] table, with a loader that copies only them from the full table."""
    per_rank = -(-vocab_size // tp.size)
    start = tp.rank * per_rank
    # Left uninitialised: every element is overwritten by the checkpoint, and initialising a large vocab is slow.
    param = nn.Parameter(torch.empty(per_rank, dim), requires_grad=False)

    def weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape != (vocab_size, dim):
            raise WeightShapeError(f"expected shape {(vocab_size, dim)}, got {tuple(loaded.shape)}")
        rows = loaded[start : start + per_rank]
        param.data[: len(rows)].copy_(rows)
        param.data[len(rows) :].zero_()  # padding: its logits are cut off, its ids never looked up

    param.weight_loader = weight_loader
    return param


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.weight = vocab_rows(vocab_size, dim, tp)
        self.per_rank = len(self.weight)
        self.start = tp.rank * self.per_rank

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits; `tied_to` reuses an embedding's weight instead of its own."""

    def __init__(self, vocab_size: int, dim: int, tied_to: VocabEmbedding | None = None, tp: TPGroup = SINGLE):
        super().__init__()
        self.tied = tied_to is not None
        self.vocab_size, self.tp = vocab_size, tp
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = vocab_rows(vocab_size, dim, tp)
        self.packed_weight: torch.Tensor | None = None  # a tied head's weight in oneDNN's layout, on the CPU

    def process_weights_after_loading(self) -> None:
        """On the CPU a float32 head moves into oneDNN's layout, as Linear weights do: it is the largest matrix a
        decode step reads. A tied head keeps the embedding's plain weight for lookups, so it holds a second copy."""
        if not onednn_packs(self.weight):
            return
        if self.tied:
            self.packed_weight = onednn_pack(self.weight)
        else:
            self.weight = nn.Parameter(onednn_pack(self.weight), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = dense_linear(hidden, self.packed_weight if self.packed_weight is not None else self.weight)
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather(logits)[:, : self.vocab_size]
