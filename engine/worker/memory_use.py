"""What the engine really holds, measured at start-up and compared with the plan's prediction component by component.

The keys are the plan's (`vdeploy plan --format json`'s `memory` table): weights_bytes, activation_bytes,
cuda_graph_bytes, overhead_bytes, kv_cache_bytes. On CUDA they come from torch's allocator and the driver; on the CPU,
where torch keeps no allocator statistics, from the tensors themselves, torch's profiler (every allocation the
profiling pass makes, in order) and the process's resident set.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

import psutil
import torch

from vdeploy_engine.config import MemoryBudget

logger = logging.getLogger(__name__)

_MiB = 1 << 20
COMPONENTS = ("weights_bytes", "activation_bytes", "cuda_graph_bytes", "overhead_bytes", "kv_cache_bytes")


def module_tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the tensors the module's layers hold (parameters, buffers and plain tensor attributes such as a tied
    head's packed copy), each storage counted once; a oneDNN-packed weight is opaque and counted by its elements."""
    seen: set[int] = set()
    total = 0
    for layer in module.modules():
        held = [*layer._parameters.values(), *layer._buffers.values(), *vars(layer).values()]
        for tensor in held:
            if not isinstance(tensor, torch.Tensor):
                continue
            if tensor.is_mkldnn:
                key, size = id(tensor), tensor.numel() * tensor.element_size()
            else:
                storage = tensor.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
            if key not in seen:
                seen.add(key)
                total += size
    return total


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_MMAP_THRESHOLD_BYTES = 1 * _MiB


def return_large_blocks_when_freed() -> None:
    """Has glibc serve every block of 1 MiB or more from its own mapping, returned to the system when freed. By default
    the threshold rises to the largest block yet freed (up to 32 MiB): a prefill's activations then come from the
    heap, which they fragment, and the process's resident set rises far beyond what is live (SmolLM2's 2048-token
    profiling step: 119 MiB against 73 MiB at the fixed threshold), by an amount that differs from run to run. Setting
    the threshold fixes it. Called once per CPU process, before the weights are read."""
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def cpu_peak_bytes(run: Callable[[], object]) -> int:
    """How far the resident set rose above its level before `run` at the peak of `run`: Linux's high-water mark
    (VmHWM), reset first through /proc/self/clear_refs. The allocator first returns what it kept of earlier frees
    (glibc's malloc_trim), so that `run` reuses none of it: the rise is then what `run` allocates, whatever the heap
    looked like before."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = process_rss_bytes()
    run()
    return max(_resident_high_water_mark() - before, 0)


def _resident_high_water_mark() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


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


# How far a measurement may sit from its prediction, as a share of the prediction (the plan's goal: within 5% on CUDA,
# 10% on the CPU). The CPU's figures come from the resident set, which also moves by a few MiB of pages either way,
# whatever the model: hence an absolute slack there. The CPU process's own size is one figure for every model and
# machine, while what is resident of the same libraries differs by machine (417-539 MiB measured for one tiny model,
# vdeploy/memory.py): 35% for it.
TOLERANCE = {"cuda": 0.05, "cpu": 0.10}
CPU_OVERHEAD_TOLERANCE = 0.35
CPU_SLACK_BYTES = 16 * _MiB
CUDA_SLACK_BYTES = 1 * _MiB  # the caching allocator rounds every block up (512 bytes, 2 MiB segments)


def memory_problems(device: str, predicted: MemoryBudget, measured: dict[str, int]) -> list[str]:
    """Where a measurement breaks its prediction: a component off by more than the tolerance either way, or the
    measured total above the predicted total (the plan must never under-predict). Empty when the plan holds."""
    slack = CPU_SLACK_BYTES if device == "cpu" else CUDA_SLACK_BYTES
    problems = []
    for key in COMPONENTS:
        if key not in measured:
            continue
        planned, value = getattr(predicted, key), measured[key]
        share = CPU_OVERHEAD_TOLERANCE if (device, key) == ("cpu", "overhead_bytes") else TOLERANCE[device]
        if abs(value - planned) > share * planned + slack:
            problems.append(f"{key}: measured {value / _MiB:.1f} MiB, predicted {planned / _MiB:.1f} MiB")
    planned_total = sum(getattr(predicted, key) for key in COMPONENTS if key in measured)
    if sum(measured.values()) > planned_total:
        problems.append(
            f"total: measured {sum(measured.values()) / _MiB:.1f} MiB exceeds the predicted {planned_total / _MiB:.1f} MiB"
        )
    return problems
