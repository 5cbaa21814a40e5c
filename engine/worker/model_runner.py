"""The model runner: owns the model and the KV cache tensors, turns a scheduled step into one flat forward pass.

A step's tokens are concatenated without padding; each token's KV slot comes from its sequence's block table. On
CUDA, unless enforce_eager, a decode step (one new token per sequence) is written straight into pinned mirrors of
persistent input buffers and replays a CUDA graph captured on those buffers (engine/worker/cuda_graph.py), which also
computes the logits and their argmax: a greedy batch then costs one graph launch and one copy back per step, which
matters at batch 1, where the host's time per step is as long as the GPU's.

On CUDA the KV cache is sized by measurement, as vLLM does: weights as loaded, the peak of a profiling forward pass
at max_num_batched_tokens (plus the sampler), memory outside torch (CUDA context), and the CUDA graphs' pool; the cache
takes what is left of gpu_memory_utilization, and never more than the plan's prediction, so the plan's peak holds.
On the CPU the cache has the plan's size; the same components are measured (engine/worker/memory_use.py), the
overhead being what the process holds beyond its tensors. Either way `measured` is logged beside the prediction.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.distributed as dist

from vdeploy_engine import progress
from vdeploy_engine.config import EngineConfig
from vdeploy_engine.core.scheduler import SchedulerOutput
from vdeploy_engine.core.sequence import Sequence
from vdeploy_engine.distributed.parallel import SINGLE_WORLD, World
from vdeploy_engine.layers.attention import Attention, AttentionMetadata
from vdeploy_engine.worker.memory_use import (
    cpu_peak_bytes,
    log_predicted_vs_measured,
    module_tensor_bytes,
    process_rss_bytes,
)
from vdeploy_engine.worker.sampler import Sampler, SamplerOutput

logger = logging.getLogger(__name__)

_MiB = 1 << 20
_GiB = 1 << 30
_DEFAULT_GRAPH_BYTES = 256 * _MiB  # graph pool reserve when no plan predicted one
# Under pipeline parallelism a step's sequences run as this many micro-batches per stage: with S stages and M
# micro-batches the stages idle (S - 1) / (M + S - 1) of a step, filling and draining the pipeline.
MICRO_BATCHES_PER_STAGE = 2


def _kv_dtype(config: EngineConfig) -> torch.dtype:
    name = config.dtype if config.kv_cache_dtype == "auto" else config.kv_cache_dtype
    if name not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"kv_cache_dtype: {config.kv_cache_dtype!r} is not supported yet (use auto)")
    return getattr(torch, name)


class ModelRunner:
    """One per rank. Rank 0's runner prepares each step's inputs and runs the step's device work on every rank
    (`_on_all_ranks`); the other ranks' runners only run what it sends (vdeploy_engine.distributed.executor)."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, world: World = SINGLE_WORLD):
        progress.phase("warming")  # the profile run, the KV cache, CUDA graph capture
        self.config = config
        self.world = world
        self.device = torch.device(config.device)
        self.model = model
        self.block_size = config.block_size
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.kv_dtype = _kv_dtype(config)
        self.bytes_per_block = sum(
            2 * self.block_size * layer.num_kv_heads * layer.head_dim * self.kv_dtype.itemsize
            for layer in self.attn_layers
        )
        self.sampler = Sampler(self.device, config.seed)
        # Bytes per GPU (on the CPU: of the process) as measured at start-up, keyed like the plan's memory table.
        self.measured: dict[str, int] = {}
        self._measure_weights_and_activations()
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        self.num_blocks = world.min(self._kv_cache_bytes() // self.bytes_per_block)  # ranks measure apart
        if self.num_blocks <= 0:
            raise ValueError(
                "No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
                "initializing the engine (or kv_cache_memory_bytes on CPU)."
            )
        if self.num_blocks < self.max_blocks_per_seq:
            fits = self.num_blocks * self.block_size
            raise ValueError(
                f"The model's max seq len ({config.max_model_len}) is larger than the maximum number of tokens that "
                f"can be stored in KV cache ({fits}). Try increasing `gpu_memory_utilization` or decreasing "
                f"`max_model_len` (the largest that fits is {fits})."
            )
        self.num_cpu_blocks = int(config.swap_space * _GiB) // self.bytes_per_block
        self.kv_caches = self._allocate(self.num_blocks, self.device)
        self.cpu_caches = self._allocate(self.num_cpu_blocks, torch.device("cpu")) if self.num_cpu_blocks else []
        for layer, (k, v) in zip(self.attn_layers, self.kv_caches, strict=True):
            layer.k_cache, layer.v_cache = k, v
        self._graph_logits: torch.Tensor | None = None  # this step's logits when a graph produced them
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager and world.stage.size == 1:
            from vdeploy_engine.worker.cuda_graph import DecodeGraphs

            self._decode_buffers = _DecodeBuffers(config.max_num_seqs, self.max_blocks_per_seq, self.device)
            self.graphs = DecodeGraphs(model, self._decode_buffers, config.max_num_seqs)
            self._token_slots = [torch.zeros(config.max_num_seqs, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self._launches = 0
            self.graphs.capture()
        self.measured["cuda_graph_bytes"] = self.graphs.memory_bytes if self.graphs else 0
        self.measured["kv_cache_bytes"] = self.num_blocks * self.bytes_per_block
        if self.device.type == "cpu":  # the interpreter, torch, the tokenizer, the allocator's slack
            self.measured["overhead_bytes"] = (
                process_rss_bytes() - self.measured["weights_bytes"] - self.measured["kv_cache_bytes"]
            )
        log_predicted_vs_measured(self.device.type, config.predicted_memory, self.measured)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB), %d CPU swap blocks",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.bytes_per_block / (1 << 20),
            self.num_cpu_blocks,
        )

    def _kv_cache_bytes(self) -> int:
        if self.config.kv_cache_memory_bytes is not None:
            return self.config.kv_cache_memory_bytes
        if self.device.type != "cuda":
            raise ValueError("kv_cache_memory_bytes: required on CPU (LLM(...) and the compiler set it)")
        cfg, predicted, m = self.config, self.config.predicted_memory, self.measured
        total = torch.cuda.mem_get_info()[1]
        # Graphs are captured after the cache is allocated: reserve the plan's estimate for them.
        graphs = 0 if cfg.enforce_eager else predicted.cuda_graph_bytes if predicted else _DEFAULT_GRAPH_BYTES
        available = int(total * cfg.gpu_memory_utilization) - sum(m.values()) - graphs
        return max(min(available, predicted.kv_cache_bytes if predicted else available), 0)

    def _measure_weights_and_activations(self) -> None:
        m = self.measured
        if self.device.type != "cuda":
            m["weights_bytes"] = module_tensor_bytes(self.model)
            self.profile_run(self.config.max_num_seqs)  # first-call costs (threads, code pages) count as overhead
            m["activation_bytes"] = self.profile_run()
            return  # the CPU's overhead is measured once the KV cache is resident
        m["weights_bytes"] = torch.cuda.memory_allocated()
        m["activation_bytes"] = self.profile_run()
        torch.cuda.empty_cache()  # so that mem_get_info counts weights and context, not the profile's freed blocks
        free, total = torch.cuda.mem_get_info()
        m["overhead_bytes"] = (total - free) - torch.cuda.memory_reserved()  # CUDA context, NCCL, ...

    def _allocate(self, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            tuple(
                torch.zeros(
                    num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim, dtype=self.kv_dtype, device=device
                )
                for _ in range(2)
            )
            for layer in self.attn_layers
        ]

    @torch.inference_mode()
    def profile_run(self, num_tokens: int | None = None) -> int:
        """Runs the largest step the scheduler can produce (max_num_batched_tokens tokens over max_num_seqs sequences,
        or `num_tokens`) with no KV cache bound, and samples its logits; returns the peak bytes it allocated beyond
        what was held."""
        cfg = self.config
        # No sequence is longer than max_model_len, so a step holds at most max_num_seqs of them.
        num_tokens = num_tokens or min(cfg.max_num_batched_tokens, cfg.max_num_seqs * cfg.max_model_len)
        num_seqs = min(cfg.max_num_seqs, num_tokens)
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.full_like(input_ids, -1),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros(num_seqs, 1, dtype=torch.int32, device=self.device),
            cu_seqlens_q=cu,
        )
        bound = [(layer.k_cache, layer.v_cache) for layer in self.attn_layers]
        for layer in self.attn_layers:
            layer.k_cache = layer.v_cache = None

        def step() -> None:
            if self.world.stage.size > 1:
                return self._profile_stage(input_ids, positions, meta, num_seqs)
            hidden = self.model(input_ids, positions, meta)
            _sampler_peak(self.model.compute_logits(hidden[cu[1:].long() - 1]))

        try:
            if self.device.type != "cuda":
                return cpu_peak_bytes(step)
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - held
        finally:
            for layer, (k, v) in zip(self.attn_layers, bound, strict=True):
                layer.k_cache, layer.v_cache = k, v

    def _profile_stage(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, num_seqs: int
    ) -> None:
        """A pipeline stage's share of the profiling step: its layers over a whole batch (zeros from the previous
        stage), the logits on the last stage, the sampler on rank 0 (which receives the logits)."""
        stage = self.world.stage
        carried = None if stage.is_first else self._carried_zeros(len(input_ids))
        hidden = self.model(input_ids, positions, meta, carried)
        if stage.is_last:
            self.model.compute_logits(hidden[:num_seqs])
        if self.world.rank == 0:
            _sampler_peak(torch.zeros(num_seqs, self.model.config.vocab_size, dtype=self._dtype, device=self.device))

    def _carried_zeros(self, num_tokens: int) -> torch.Tensor:
        shape = (self.model.carries, num_tokens, self.model.config.hidden_size)
        return torch.zeros(shape, dtype=self._dtype, device=self.device)

    @property
    def _dtype(self) -> torch.dtype:
        return getattr(torch, self.config.dtype)

    def _on_all_ranks(self, method: str, *args: object) -> object:
        """Runs `method` here and, through the world's control channel, on every other rank's runner."""
        self.world.broadcast((method, args))
        return getattr(self, method)(*args)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput, sample_seqs: list[Sequence]) -> torch.Tensor:
        """Moves blocks (swap out, swap in, copy-on-write), runs the forward pass; returns the logits of the last
        token of each sequence in sample_seqs (those whose scheduled tokens reach the end of what they hold)."""
        self._graph_logits = None
        if self.can_run_ahead(step):
            batch = len(step.scheduled)
            rows = self._prepare_decode(step.scheduled)
            self._graph_logits = self._on_all_ranks("_replay_decode", _moves(step), batch, rows, False, self._sent(rows))
            return self._graph_logits
        input_ids, positions, meta, last_rows = self._prepare(step.scheduled)
        sampled = {id(seq) for seq in sample_seqs}
        rows = [row for (seq, _), row in zip(step.scheduled, last_rows, strict=True) if id(seq) in sampled]
        return self._on_all_ranks("_forward", _moves(step), input_ids, positions, meta, rows)

    @torch.inference_mode()
    def _forward(
        self, moves: _Moves, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, rows: list[int]
    ) -> torch.Tensor:
        """A step's forward pass over host inputs; the logits of `rows`."""
        self._move_blocks(moves)
        if self.world.stage.size > 1:
            return self._forward_pipelined(input_ids, positions, meta, rows)
        dev = self.device
        hidden = self.model(input_ids.to(dev), positions.to(dev), meta.to(dev))
        if len(rows) < len(hidden):  # indexing by a host list waits for the GPU: a decode step (every row) skips it
            hidden = hidden[rows]
        return self.model.compute_logits(hidden)

    def _forward_pipelined(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, rows: list[int]
    ) -> torch.Tensor | None:
        """This rank's stage of a step, micro-batch after micro-batch: each micro-batch's activations go on to the
        next stage while this one runs the next micro-batch, so that the stages work at once. The last stage sends
        the logits of `rows` back to rank 0, which returns them (other ranks return None)."""
        world, stage, dev = self.world, self.world.stage, self.device
        sending = []  # tensors in flight to the next stage, with their handles: kept until sent
        parts = micro_batches(meta, len(input_ids), rows, stage.size * MICRO_BATCHES_PER_STAGE)
        for tokens, part_meta, part_rows in parts:
            carried = None
            if not stage.is_first:
                shape = (self.model.carries, tokens.stop - tokens.start, self.model.config.hidden_size)
                carried = stage.receive(shape, self._dtype, dev)
            out = self.model(input_ids[tokens].to(dev), positions[tokens].to(dev), part_meta.to(dev), carried)
            if not stage.is_last:
                sending.append((out, stage.send(out)))
            elif part_rows:
                logits = self.model.compute_logits(out[part_rows])
                if world.rank == world.sampler_rank:
                    sending.append((logits, dist.isend(logits, 0)))
        logits = None
        if world.rank == 0:
            shapes = [(len(part_rows), self.model.config.vocab_size) for _, _, part_rows in parts if part_rows]
            logits = torch.cat([_received(shape, self._dtype, dev, world.sampler_rank) for shape in shapes])
        for _, handle in sending:
            handle.wait()
        return logits

    def can_run_ahead(self, step: SchedulerOutput) -> bool:
        """Whether `step` is a decode step a captured graph runs (what launch_decode takes)."""
        return self.graphs is not None and _is_decode(step.scheduled) and len(step.scheduled) <= self.graphs.max_batch

    @torch.inference_mode()
    def launch_decode(self, step: SchedulerOutput, inputs_on_device: bool) -> Callable[[], list[int]]:
        """Launches a decode step through its graph without waiting for it; returns a function that waits for the
        step and returns its greedy tokens. With `inputs_on_device`, the input tokens are the previous launch's
        (the sequences and their order are the same), which the host does not know yet."""
        batch = len(step.scheduled)
        rows = self._prepare_decode(step.scheduled)
        self._on_all_ranks("_replay_decode", _moves(step), batch, rows, inputs_on_device, self._sent(rows))
        # Two launches can be outstanding (one landing while the next runs): alternate two pinned slots.
        slot = self._token_slots[self._launches % 2]
        self._launches += 1
        slot[:batch].copy_(self.graphs.tokens[:batch], non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def tokens() -> list[int]:
            done.synchronize()
            return slot[:batch].tolist()

        return tokens

    def sample(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        stop_ids: list[set[int]],
        apply_token_masks: Callable[[torch.Tensor], None] | None = None,
    ) -> SamplerOutput:
        """The graph already took the argmax of its logits: a batch of plain greedy rows only copies it back."""
        if logits is self._graph_logits and not any(stop_ids) and all(seq.request.params.argmax_only for seq in seqs):
            return SamplerOutput(self.graphs.tokens[: len(seqs)].tolist(), [None] * len(seqs))
        with torch.inference_mode():
            return self.sampler(logits, seqs, stop_ids, apply_token_masks)

    def _sent(self, rows: int) -> dict[str, object] | None:
        """The decode inputs rank 0 filled, for the other ranks (None when there are none)."""
        return self._decode_buffers.rows(rows) if self.world.size > 1 else None

    @torch.inference_mode()
    def _replay_decode(
        self, moves: _Moves, batch: int, rows: int, inputs_on_device: bool, sent: dict[str, object] | None
    ) -> torch.Tensor:
        """Copies the filled decode inputs to the device (`sent`: rank 0's, on another rank) and replays the graph
        of `rows` rows; with `inputs_on_device`, the input tokens are the previous replay's argmax."""
        self._move_blocks(moves)
        if sent is not None and self.world.rank > 0:
            self._decode_buffers.fill(sent)
        self._decode_buffers.upload(rows)
        if inputs_on_device:
            self._decode_buffers.input_ids[:batch].copy_(self.graphs.tokens[:batch])
        return self.graphs.replay(batch)

    def _prepare_decode(self, scheduled: list[tuple[Sequence, int]]) -> int:
        """Fills the pinned host mirrors of the decode buffers row by row (no tensor ops: this runs every step);
        returns the rows of the graph the batch replays (rows past the batch are padding)."""
        host, bs = self._decode_buffers.host, self.block_size
        rows = self.graphs.padded(len(scheduled))
        for i, (seq, _) in enumerate(scheduled):
            pos = seq.num_computed_tokens
            host.input_ids[i] = seq.token_ids[pos]
            host.positions[i] = pos
            host.slot_mapping[i] = seq.block_table[pos // bs] * bs + pos % bs
            host.seq_lens[i] = pos + 1
            host.block_tables[i, : len(seq.block_table)] = seq.block_table
        padding = slice(len(scheduled), rows)  # any valid token at position 0, attending over itself
        host.input_ids[padding] = 0  # the mirrors may hold a launched-ahead step's PENDING_TOKEN there
        host.positions[padding] = 0
        host.slot_mapping[padding] = -1
        host.seq_lens[padding] = 1
        return rows

    def _prepare(
        self, scheduled: list[tuple[Sequence, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        starts, q_lens, seq_lens = [], [], []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            input_ids += seq.token_ids[start : start + n]
            starts.append(start)
            q_lens.append(n)
            seq_lens.append(start + n)
        width = max(len(seq.block_table) for seq, _ in scheduled)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in scheduled]
        block_tables = torch.tensor(tables, dtype=torch.int32)
        q_lens_t = torch.tensor(q_lens)
        cu_q = torch.zeros(len(scheduled) + 1, dtype=torch.long)
        torch.cumsum(q_lens_t, 0, out=cu_q[1:])
        seq_index = torch.repeat_interleave(torch.arange(len(scheduled)), q_lens_t)
        positions = torch.arange(len(input_ids)) - cu_q[seq_index] + torch.tensor(starts)[seq_index]
        slots = block_tables[seq_index, positions // bs].long() * bs + positions % bs
        last_rows = (cu_q[1:] - 1).tolist()
        ids = torch.tensor(input_ids, dtype=torch.long)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        # A decode-only batch (one query per sequence) takes the decode kernel: no query offsets.
        cu = None if len(input_ids) == len(scheduled) else cu_q.to(torch.int32)
        return ids, positions, AttentionMetadata(slots, lens, block_tables, cu), last_rows

    def _move_blocks(self, moves: _Moves) -> None:
        swap_out, swap_in, copies = moves
        for (k, v), cpu in zip(self.kv_caches, self.cpu_caches or [None] * len(self.kv_caches), strict=True):
            if swap_out:
                gpu_ids, cpu_ids = (torch.tensor(x) for x in zip(*swap_out, strict=True))
                for cache, host in zip((k, v), cpu, strict=True):
                    host[cpu_ids] = cache[gpu_ids.to(cache.device)].cpu()
            if swap_in:
                cpu_ids, gpu_ids = (torch.tensor(x) for x in zip(*swap_in, strict=True))
                for cache, host in zip((k, v), cpu, strict=True):
                    cache[gpu_ids.to(cache.device)] = host[cpu_ids].to(cache.device)
            if copies:
                src, dst = (torch.tensor(x, device=k.device) for x in zip(*copies, strict=True))
                for cache in (k, v):
                    cache[dst] = cache[src]


_Moves = tuple[list, list, list]  # a step's KV block moves: swap_out, swap_in, copies (pairs of block ids)


def _moves(step: SchedulerOutput) -> _Moves:
    return step.swap_out, step.swap_in, step.copies


def micro_batches(
    meta: AttentionMetadata, num_tokens: int, rows: list[int], parts: int
) -> list[tuple[slice, AttentionMetadata, list[int]]]:
    """A step's sequences in up to `parts` consecutive groups of about as many tokens each: for each, its tokens,
    its attention metadata and its rows of `rows` (counted from its first token). Host tensors in, host tensors out;
    every stage computes the same split from the same inputs."""
    num_seqs = len(meta.seq_lens)
    cu = meta.cu_seqlens_q.long() if meta.cu_seqlens_q is not None else torch.arange(num_seqs + 1)
    # The first sequence of each group: where its cumulative tokens reach k/parts of the step's, never empty.
    cuts = [0]
    for k in range(1, min(parts, num_seqs)):
        cut = int(torch.searchsorted(cu, k * num_tokens / parts))
        if cuts[-1] < cut < num_seqs:
            cuts.append(cut)
    cuts.append(num_seqs)
    out = []
    for first, end in itertools.pairwise(cuts):
        start, stop = int(cu[first]), int(cu[end])
        part_cu = None if meta.cu_seqlens_q is None else (meta.cu_seqlens_q[first : end + 1] - start)
        part_meta = AttentionMetadata(meta.slot_mapping[start:stop], meta.seq_lens[first:end],
                                      meta.block_tables[first:end], part_cu)
        out.append((slice(start, stop), part_meta, [r - start for r in rows if start <= r < stop]))
    return out


def _received(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, source: int) -> torch.Tensor:
    x = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(x, source)
    return x


def _sampler_peak(logits: torch.Tensor) -> None:
    """Allocates what the sampler's top-k/top-p path holds at once over a batch of logits, for the profiling pass."""
    sorted_logits, order = logits.float().sort(dim=-1, descending=True)
    sorted_logits.softmax(dim=-1).cumsum(dim=-1)


def _is_decode(scheduled: list[tuple[Sequence, int]]) -> bool:
    """One new token per sequence, each reaching the end of what its sequence holds."""
    return all(n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens for seq, n in scheduled)


class _DecodeBuffers:
    """Persistent decode inputs on the device (fixed addresses, as CUDA graph replay needs) and pinned host mirrors
    (`host`, numpy views) that a step fills in place; `upload(rows)` copies the first rows of each asynchronously.
    The mirrors come in two sets used in turn: a step launched ahead fills one while the previous step's upload may
    still be queued behind the GPU's work, reading the other."""

    def __init__(self, max_num_seqs: int, max_blocks: int, device: torch.device):
        shapes = dict(
            input_ids=((max_num_seqs,), torch.long),
            positions=((max_num_seqs,), torch.long),
            slot_mapping=((max_num_seqs,), torch.long),
            seq_lens=((max_num_seqs,), torch.int32),
            block_tables=((max_num_seqs, max_blocks), torch.int32),
        )
        for name, (shape, dtype) in shapes.items():
            setattr(self, name, torch.zeros(shape, dtype=dtype, device=device))
        self._mirrors = [
            {name: torch.zeros(shape, dtype=dtype, pin_memory=True) for name, (shape, dtype) in shapes.items()}
            for _ in range(2)
        ]
        self._views = [SimpleNamespace(**{name: t.numpy() for name, t in set_.items()}) for set_ in self._mirrors]
        self._uploads = 0

    @property
    def host(self) -> SimpleNamespace:
        """The mirror set the next step fills."""
        return self._views[self._uploads % 2]

    def rows(self, rows: int) -> dict[str, object]:
        """Copies of the first `rows` rows of each mirror the next upload sends (for the other ranks)."""
        return {name: view[:rows].copy() for name, view in vars(self.host).items()}

    def fill(self, rows: dict[str, object]) -> None:
        """Writes rows taken by `rows` on another rank into the mirrors the next upload sends."""
        for name, values in rows.items():
            getattr(self.host, name)[: len(values)] = values

    def upload(self, rows: int) -> None:
        for name, mirror in self._mirrors[self._uploads % 2].items():
            getattr(self, name)[:rows].copy_(mirror[:rows], non_blocking=True)
        self._uploads += 1
