"""Continuous batching: each step picks which sequences compute how many tokens.

One token budget (`max_num_batched_tokens`) per step, spent first on running sequences in arrival order (a decode
costs one token; a prompt still being prefilled takes the next chunk), then on swapped-out sequences, then on waiting
ones (FCFS, prefix-cache hits skipped). At most `max_num_seqs` run at once. When a running sequence needs a block and
none is free, the most recently admitted sequence is preempted: swapped to CPU when swap space allows, otherwise freed
and recomputed later (its tokens are kept, so its output does not change). A step that preempted admits nothing new.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.core.kv_cache import KVCacheManager
from vdeploy_engine.core.sequence import SeqStatus, Sequence


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute this step)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu block, cpu block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu block, gpu block)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) gpu blocks, copy-on-write


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.num_swap_outs = 0  # preemptions that swapped to CPU rather than recompute

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.kv.allocate_slots(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
        if not preempted:
            budget = self._admit_swapped(out, budget)
            self._admit_waiting(out, budget)
        now = time.time()
        for seq, _ in out.scheduled:
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
        out.swap_out, out.swap_in, out.copies = self.kv.take_pending()
        return out

    def _admit_swapped(self, out: SchedulerOutput, budget: int) -> int:
        while self.swapped and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.swapped[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.kv.can_swap_in(seq, n):
                break
            self.swapped.popleft()
            self.kv.swap_in(seq)
            self.kv.allocate_slots(seq, n)  # cannot fail: can_swap_in counted these blocks
            self._run(seq, n, out)
            budget -= n
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            computed = self.kv.computed_blocks(seq)
            remaining = seq.num_tokens - len(computed) * self.kv.block_size
            n = min(remaining, budget)
            if n < remaining and not self.chunked_prefill:
                break
            if not self.kv.allocate_slots(seq, n, computed):
                break
            self.waiting.popleft()
            if not seq.request.metrics.num_cached_tokens:
                seq.request.metrics.num_cached_tokens = seq.num_computed_tokens
            self._run(seq, n, out)
            budget -= n

    def _run(self, seq: Sequence, n: int, out: SchedulerOutput) -> None:
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        out.scheduled.append((seq, n))

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        if self.kv.free_cpu_blocks and self.kv.can_swap_out(seq):
            self.kv.swap_out(seq)
            self.num_swap_outs += 1
            seq.status = SeqStatus.SWAPPED
            self.swapped.appendleft(seq)
        else:
            self.kv.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SeqStatus.WAITING
            self.waiting.appendleft(seq)

    def update(self, out: SchedulerOutput) -> None:
        """After the step ran: the scheduled tokens' KV is now in the cache."""
        for seq, n in out.scheduled:
            seq.num_computed_tokens += n
            self.kv.cache_full_blocks(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence forked from a running one joins it."""
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Removes a finished or aborted sequence and frees its blocks."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq)
        elif seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status == SeqStatus.SWAPPED:
            self.swapped.remove(seq)
            self.kv.free_cpu_blocks.extend(seq.block_table)
            seq.block_table = []
        seq.status = SeqStatus.FINISHED
