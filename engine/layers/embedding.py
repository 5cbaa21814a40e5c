"""Token embedding and the LM head that may share its weight (tied embeddings)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vdeploy_engine.layers.linear import dense_linear, onednn_pack, onednn_packs


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        # Left uninitialised: every element is overwritten by the checkpoint, and initialising a large vocab is slow.
        self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits; `tied_to` reuses an embedding's weight instead of its own."""

    def __init__(self, vocab_size: int, dim: int, tied_to: VocabEmbedding | None = None):
        super().__init__()
        self.tied = tied_to is not None
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)
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
        return dense_linear(hidden, self.packed_weight if self.packed_weight is not None else self.weight)
