"""The paged KV cache's bookkeeping: which block holds which sequence's tokens. (The tensors live in the model runner.)

- Blocks have reference counts. Forked sequences (n > 1) share blocks; the first write into a shared, partly filled
  block copies it (copy-on-write): the copy is queued in `pending_copies` for the runner to perform before the step.
- Prefix caching: each full block is named by a hash chained from its predecessor's, so a block's name stands for the
  whole prefix up to it. A freed block keeps its name and stays reusable until it is handed out again, least
  recently freed first (and a sequence's tail before its head).
- Swap: with CPU blocks (`swap_space`), a preempted sequence's blocks are copied out and back in later; the copies are
  queued in `pending_swap_out` / `pending_swap_in`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from vdeploy_engine.core.sequence import PENDING_TOKEN, Sequence


@dataclass
class KVCacheStats:
    num_blocks: int
    used_blocks: int
    free_blocks: int
    cached_blocks: int  # blocks named in the prefix cache (in use or free but still reusable)
    waste_slots: int  # slots allocated to running sequences that hold no token

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, num_cpu_blocks: int = 0, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = reused first
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # prefix hash -> block id
        self.free_cpu_blocks = list(range(num_cpu_blocks))
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) GPU blocks, copy-on-write
        self.pending_swap_out: list[tuple[int, int]] = []  # (gpu, cpu)
        self.pending_swap_in: list[tuple[int, int]] = []  # (cpu, gpu)
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    # -- prefix caching ------------------------------------------------------------------------------------------

    def _full_block_hashes(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Chained hashes of the full blocks among seq's first num_tokens tokens (memoised on the sequence)."""
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), num_tokens // bs):
            block = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            if PENDING_TOKEN in block:  # named once the step computing it has landed
                break
            hashes.append(hash((hashes[-1] if hashes else None, block)))
        return hashes[: num_tokens // bs]

    def computed_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's longest prefix. At least one token is left to compute, to produce logits."""
        if not self.enable_prefix_caching or seq.num_computed_tokens:
            return []
        hits = []
        for h in self._full_block_hashes(seq, seq.num_tokens - 1):
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Names seq's blocks that became full of computed tokens, so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        for i, h in enumerate(self._full_block_hashes(seq, seq.num_computed_tokens)):
            block = seq.block_table[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block] = h
                self.cached[h] = block

    # -- allocation ----------------------------------------------------------------------------------------------

    def _take_free(self, block: int) -> None:
        """Marks a block as used; one that held a cached prefix loses its name unless it is being reused for it."""
        del self.free_blocks[block]
        self.ref_counts[block] = 1

    def _new_block(self) -> int:
        block = next(iter(self.free_blocks))
        self._take_free(block)
        h = self.block_hash[block]
        if h is not None:
            self.block_hash[block] = None
            del self.cached[h]
        return block

    def _needs_copy_on_write(self, seq: Sequence) -> bool:
        offset = seq.num_computed_tokens % self.block_size
        return offset != 0 and self.ref_counts[seq.block_table[-1]] > 1

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed: list[int] | None = None) -> bool:
        """Gives seq room for its next num_new_tokens tokens (after the `computed` prefix blocks, for a new
        sequence). Returns False, changing nothing, when there are not enough free blocks."""
        computed = computed or []
        num_computed = len(computed) * self.block_size if computed else seq.num_computed_tokens
        have = len(computed) if computed else len(seq.block_table)
        new_blocks = -(-(num_computed + num_new_tokens) // self.block_size) - have
        cow = bool(not computed and seq.block_table and self._needs_copy_on_write(seq))
        revived = sum(1 for b in computed if self.ref_counts[b] == 0)
        if new_blocks + cow + revived > self.num_free_blocks:
            return False
        if self.enable_prefix_caching and not seq.block_table and not seq.num_computed_tokens:  # a prompt's lookup
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += num_computed
        if computed:
            for block in computed:
                if self.ref_counts[block] == 0:
                    self._take_free(block)
                else:
                    self.ref_counts[block] += 1
            seq.block_table = list(computed)
            seq.num_computed_tokens = num_computed
        if cow:
            shared = seq.block_table[-1]
            self.ref_counts[shared] -= 1
            seq.block_table[-1] = self._new_block()
            self.pending_copies.append((shared, seq.block_table[-1]))
        seq.block_table.extend(self._new_block() for _ in range(new_blocks))
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child (a copy of parent) now shares all of parent's blocks."""
        for block in parent.block_table:
            self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        """Releases seq's GPU blocks (tail first, so a prefix's head stays cached longest)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []

    # -- swapping ------------------------------------------------------------------------------------------------

    def can_swap_out(self, seq: Sequence) -> bool:
        return len(seq.block_table) <= len(self.free_cpu_blocks)

    def swap_out(self, seq: Sequence) -> None:
        cpu_blocks = [self.free_cpu_blocks.pop() for _ in seq.block_table]
        self.pending_swap_out.extend(zip(seq.block_table, cpu_blocks, strict=True))
        self.free(seq)
        seq.block_table = cpu_blocks

    def can_swap_in(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether seq fits back in, with room for its next num_new_tokens tokens."""
        return -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) <= self.num_free_blocks

    def swap_in(self, seq: Sequence) -> None:
        gpu_blocks = [self._new_block() for _ in seq.block_table]
        self.pending_swap_in.extend(zip(seq.block_table, gpu_blocks, strict=True))
        self.free_cpu_blocks.extend(seq.block_table)
        seq.block_table = gpu_blocks

    def take_pending(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
        """The block copies a step must perform before its forward pass, in order: swap out, swap in, copy."""
        pending = (self.pending_swap_out, self.pending_swap_in, self.pending_copies)
        self.pending_swap_out, self.pending_swap_in, self.pending_copies = [], [], []
        return pending

    def stats(self, running: list[Sequence]) -> KVCacheStats:
        waste = sum(len(s.block_table) * self.block_size - s.num_computed_tokens for s in running)
        return KVCacheStats(
            num_blocks=self.num_blocks,
            used_blocks=self.num_blocks - self.num_free_blocks,
            free_blocks=self.num_free_blocks,
            cached_blocks=len(self.cached),
            waste_slots=waste,
        )
