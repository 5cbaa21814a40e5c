"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of a decode step.

A decode step at batch 1 is a chain of ~170 short kernels, each of which otherwise starts only once the one before has
drained, and then first waits for its own loads. Launched with PDL, a kernel may start while the kernel before it is
still running: its programs do what does not depend on that kernel (a GEMV starts reading its weight), call
`wait_for_previous`, which returns once the previous kernel has finished and its writes are visible, and from then on
let the next kernel start early in turn. Inside CUDA graphs the same dependency is captured as a programmatic edge.

The rule for a kernel launched with PDL: before `wait_for_previous` it may only read memory that no kernel of the step
writes (weights, and the step's inputs: positions, slots, block tables, sequence lengths, which are copied in before the
step's first kernel), and it may not write at all (its output may reuse memory that the previous kernel still reads).
Reading those early takes their round trips to memory off the chain of kernels.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = True  # benchmarks switch it off to measure what it gains


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl(x: torch.Tensor) -> bool:
    """Whether kernels over x launch with PDL: CUDA tensors on Hopper or later (never in the CPU interpreter)."""
    return ENABLED and x.is_cuda and _supported(x.device.index if x.device.index is not None else 0)


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Waits until the previous kernel's writes are visible, then lets the next kernel launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
