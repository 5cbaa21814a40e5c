"""What the engine really holds, measured at start-up and compared with the plan's prediction component by component.

The keys are the plan's (`vdeploy plan --format json`'s `memory` table): weights_bytes, activation_bytes,
cuda_graph_bytes, overhead_bytes, kv_cache_bytes. On CUDA they come from torch's allocator and the driver; on the CPU,
where torch keeps no allocator statistics, from the tensors themselves, torch's profiler (every allocation the
profiling pass makes, in order) and the process's resident set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import psutil
import torch

from vdeploy_engine.config import MemoryBudget

logger = logging.getLogger(__name__)

_MiB = 1 << 20
COMPONENTS = ("weights_bytes", "activation_bytes", "cuda_graph_bytes", "overhead_bytes", "kv_cache_bytes")


def module_tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers, each storage counted once (a tied head shares the embedding's;
    a oneDNN-packed weight is opaque and counted by its elements)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_mkldnn:
            total += tensor.numel() * tensor.element_size()
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def cpu_peak_bytes(run: Callable[[], object]) -> int:
    """Peak bytes the CPU allocator holds for `run` beyond what was held before it: torch's profiler records every
    allocation and free with its size, and the peak is the highest running sum."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def process_rss_bytes() -> int:
    """The resident set of this process: the interpreter, torch and every library, the tokenizer, the tensors."""
    return psutil.Process().memory_info().rss


def log_predicted_vs_measured(device: str, predicted: MemoryBudget | None, measured: dict[str, int]) -> None:
    def row(name: str, planned: int | None, value: int) -> str:
        return f"{name:>12} {'-' if planned is None else f'{planned / _MiB:.1f}':>10} {value / _MiB:10.1f}"

    rows = [
        row(key.removesuffix("_bytes"), predicted and getattr(predicted, key), measured[key])
        for key in COMPONENTS
        if key in measured
    ]
    total = predicted and sum(getattr(predicted, key) for key in COMPONENTS)
    rows.append(row("total", total, sum(measured.values())))
    where = "GPU memory per GPU" if device == "cuda" else "CPU memory (resident)"
    logger.info("%s (MiB)   predicted   measured\n%s", where, "\n".join(rows))
