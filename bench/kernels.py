"""GPU microbenchmark: each Triton kernel against its torch reference (and torch SDPA for attention), in one run.

    python3 bench/ops.py [--out bench/results/kernels-<gpu>.json] [--quick]

Prints one row per case with the speed-up over each baseline, and for decode attention and the fused small-batch
linear layers the achieved bandwidth (KV cache or weight bytes read / time) as a fraction of the card's
device-to-device copy bandwidth, measured in the same run. fused_linear is timed at Qwen2.5-0.5B's decode projections
against what the model ran before it (norm or activation kernel, cuBLAS, residual add) and cuBLAS alone;
rotary_and_cache against apply_rotary + write_kv_cache (fused_linear's tiles are swept by bench/fused_linear_tiles.py).
Writes every number, the GPU's name and the command to JSON. Kernels that the engine runs inside CUDA graphs (and
every baseline that can be captured) are timed as graph replays, so Python launch cost stays out of the figures;
baselines that synchronise with the host (boolean indexing, .tolist()) are timed with events around plain calls.
Inputs rotate over enough copies to exceed the L2 cache, so small cases measure memory, not cache.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdeploy_kernels import ops  # noqa: E402
from vdeploy_kernels.activation import silu_and_mul_ref  # noqa: E402
from vdeploy_kernels.attention import (  # noqa: E402
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    varlen_attention_ref,
)
from vdeploy_kernels.kv_cache import write_kv_cache_ref  # noqa: E402
from vdeploy_kernels.rms_norm import rms_norm_ref  # noqa: E402
from vdeploy_kernels.rotary import apply_rotary_ref  # noqa: E402

DTYPE = torch.bfloat16
ROTATE_BYTES = 256 * 2**20  # inputs per case cycle over at least this many bytes (H100 L2: 50 MiB)


@dataclass
class Case:
    kernel: str
    shape: str
    triton_ms: float
    baselines: dict[str, float]  # baseline name -> ms
    bytes_moved: int = 0
    flops: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def speedups(self) -> dict[str, float]:
        return {name: ms / self.triton_ms for name, ms in self.baselines.items()}

    def gbs(self) -> float:
        return self.bytes_moved / self.triton_ms / 1e6


def time_ms(fn: Callable[[], object], graph: bool, budget_ms: float = 300.0) -> float:
    """Median milliseconds per call. With `graph`, a batch of calls is captured in one CUDA graph and replayed."""
    fn()  # compile and warm up outside any capture
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    calls = max(1, min(128, math.ceil(2.0 / once)))  # a sample of about 2 ms
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(calls):
                fn()
        run = captured.replay
    else:

        def run():
            for _ in range(calls):
                fn()

    run()
    samples = []
    for _ in range(max(5, min(50, int(budget_ms / (once * calls))))):
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)


def rotating(calls: list[Callable[[], object]]) -> Callable[[], object]:
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def copies(nbytes: int) -> int:
    return max(1, min(128, ROTATE_BYTES // max(nbytes, 1)))


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read plus bytes written per second."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), graph=True)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def paged_layout(batch: int, context: int, kv_heads: int, head_dim: int, block_size: int, sets: int):
    """One cache holding `sets` disjoint copies of the batch's context, and a block table per copy."""
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = sets * batch * blocks_per_seq
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=DTYPE)
    value_cache = torch.randn_like(key_cache)
    ids = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(sets, batch, blocks_per_seq)
    return key_cache, value_cache, list(ids)


def contiguous_heads(blocks: torch.Tensor) -> torch.Tensor:
    """[B, blocks, block_size, Hkv, D] gathered from a paged cache -> [B, Hkv, context, D] as SDPA takes it."""
    return blocks.flatten(1, 2).transpose(1, 2).contiguous()


def bench_decode(heads: tuple[int, int, int], batch: int, context: int, block_size: int = 16) -> Case:
    num_heads, kv_heads, head_dim = heads
    kv_bytes = 2 * batch * context * kv_heads * head_dim * DTYPE.itemsize
    sets = copies(kv_bytes)
    key_cache, value_cache, tables = paged_layout(batch, context, kv_heads, head_dim, block_size, sets)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, num_heads, head_dim, device="cuda", dtype=DTYPE)
    scale = head_dim**-0.5

    def calls(fn):
        return rotating([lambda t=t: fn(q, key_cache, value_cache, t, seq_lens, scale) for t in tables])

    triton_ms = time_ms(calls(ops.paged_decode_attention), graph=True)
    reference_ms = time_ms(calls(paged_decode_attention_ref), graph=True)
    # SDPA over contiguous per-sequence K/V, what an engine without a paged cache would keep.
    sdpa_sets = [(contiguous_heads(key_cache[t]), contiguous_heads(value_cache[t])) for t in tables]
    q4 = q[:, :, None]
    sdpa = rotating(
        [lambda k=k, v=v: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True) for k, v in sdpa_sets]
    )
    sdpa_ms = time_ms(sdpa, graph=True)
    return Case(
        "paged_decode_attention",
        f"B={batch} ctx={context} H={num_heads}/{kv_heads} D={head_dim} bs={block_size}",
        triton_ms,
        {"torch_reference": reference_ms, "torch_sdpa_contiguous": sdpa_ms},
        bytes_moved=kv_bytes,
    )


def bench_prefill(heads: tuple[int, int, int], batch: int, prompt: int, prefix: int, block_size: int = 16) -> Case:
    """`batch` sequences, each computing `prompt` new tokens after a cached `prefix`."""
    num_heads, kv_heads, head_dim = heads
    context = prefix + prompt
    key_cache, value_cache, (table,) = paged_layout(batch, context, kv_heads, head_dim, block_size, 1)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    cu = torch.arange(0, (batch + 1) * prompt, prompt, dtype=torch.int32, device="cuda")
    q = torch.randn(batch * prompt, num_heads, head_dim, device="cuda", dtype=DTYPE)
    scale = head_dim**-0.5
    args = (q, key_cache, value_cache, table, cu, seq_lens, scale)
    triton_ms = time_ms(lambda: ops.paged_prefill_attention(*args), graph=True)
    baselines = {"torch_reference": time_ms(lambda: paged_prefill_attention_ref(*args), graph=False)}
    if prefix == 0:  # SDPA's causal mask is top-left aligned, the same as ours only without a prefix
        qs = q.view(batch, prompt, num_heads, head_dim).transpose(1, 2)
        ks, vs = contiguous_heads(key_cache[table]), contiguous_heads(value_cache[table])
        sdpa = functools.partial(
            F.scaled_dot_product_attention, qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True
        )
        baselines["torch_sdpa_contiguous"] = time_ms(sdpa, graph=True)
    visible_pairs = batch * (prompt * prefix + prompt * (prompt + 1) // 2)
    return Case(
        "paged_prefill_attention",
        f"B={batch} new={prompt} prefix={prefix} H={num_heads}/{kv_heads} D={head_dim} bs={block_size}",
        triton_ms,
        baselines,
        flops=4 * visible_pairs * num_heads * head_dim,
    )


def bench_mixed_batch(heads: tuple[int, int, int], decodes: int, context: int, prompt: int) -> Case:
    """A chunked-prefill step: `decodes` sequences with one new token at `context`, plus one `prompt`-token prompt,
    all through the prefill kernel, against launching the decode kernel for the former and prefill for the latter."""
    num_heads, kv_heads, head_dim = heads
    key_cache, value_cache, (table,) = paged_layout(decodes + 1, max(context, prompt), kv_heads, head_dim, 16, 1)
    seq_lens = torch.tensor([context] * decodes + [prompt], dtype=torch.int32, device="cuda")
    cu = torch.tensor([*range(decodes + 1), decodes + prompt], dtype=torch.int32, device="cuda")
    q = torch.randn(decodes + prompt, num_heads, head_dim, device="cuda", dtype=DTYPE)
    scale = head_dim**-0.5
    args = (q, key_cache, value_cache, table, cu, seq_lens, scale)
    prompt_cu = torch.tensor([0, prompt], dtype=torch.int32, device="cuda")

    def separate_launches():
        ops.paged_decode_attention(q[:decodes], key_cache, value_cache, table[:decodes], seq_lens[:decodes], scale)
        ops.paged_prefill_attention(
            q[decodes:], key_cache, value_cache, table[decodes:], prompt_cu, seq_lens[decodes:], scale
        )

    return Case(
        "paged_prefill_attention",
        f"mixed: {decodes} decodes at ctx={context} + prompt {prompt} H={num_heads}/{kv_heads} D={head_dim}",
        time_ms(lambda: ops.paged_prefill_attention(*args), graph=True),
        {
            "torch_reference": time_ms(lambda: paged_prefill_attention_ref(*args), graph=False),
            "decode_and_prefill_launches": time_ms(separate_launches, graph=True),
        },
        bytes_moved=2 * (decodes * context + prompt) * kv_heads * head_dim * DTYPE.itemsize,
    )


def bench_varlen(heads: tuple[int, int, int], batch: int, length: int, causal: bool) -> Case:
    num_heads, kv_heads, head_dim = heads
    tokens = batch * length
    q = torch.randn(tokens, num_heads, head_dim, device="cuda", dtype=DTYPE)
    k = torch.randn(tokens, kv_heads, head_dim, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    cu = torch.arange(0, tokens + 1, length, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    triton_ms = time_ms(lambda: ops.varlen_attention(q, k, v, cu, scale, causal), graph=True)
    qs, ks, vs = (x.view(batch, length, -1, head_dim).transpose(1, 2) for x in (q, k, v))
    sdpa = functools.partial(F.scaled_dot_product_attention, qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=True)
    pairs = batch * (length * (length + 1) // 2 if causal else length * length)
    return Case(
        "varlen_attention",
        f"B={batch} L={length} causal={causal} H={num_heads}/{kv_heads} D={head_dim}",
        triton_ms,
        {
            "torch_reference": time_ms(lambda: varlen_attention_ref(q, k, v, cu, scale, causal), graph=False),
            "torch_sdpa": time_ms(sdpa, graph=True),
        },
        flops=4 * pairs * num_heads * head_dim,
    )


def bench_elementwise(
    name: str,
    make_args: Callable[[], tuple],
    fast: Callable,
    reference: Callable,
    nbytes: int,
    reference_graph: bool = True,
) -> Case:
    arg_sets = [make_args() for _ in range(copies(nbytes))]
    return Case(
        name,
        " ".join("x".join(map(str, a.shape)) for a in arg_sets[0] if isinstance(a, torch.Tensor)),
        time_ms(rotating([lambda a=a: fast(*a) for a in arg_sets]), graph=True),
        {"torch_reference": time_ms(rotating([lambda a=a: reference(*a) for a in arg_sets]), graph=reference_graph)},
        bytes_moved=nbytes,
    )


def elementwise_cases() -> list[Case]:
    tokens, hidden, inter = 4096, 4096, 14336
    size = DTYPE.itemsize

    def randn(*shape):
        return torch.randn(shape, device="cuda", dtype=DTYPE)

    weight = randn(hidden)
    rot_dim, heads, kv_heads, head_dim = 128, 32, 8, 128
    angles = torch.outer(torch.arange(8192, device="cuda").float(), torch.rand(rot_dim // 2, device="cuda"))
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    cache_shape = (tokens // 16 * 2, 16, kv_heads, head_dim)
    key_cache, value_cache = randn(*cache_shape), randn(*cache_shape)
    slots = torch.randperm(key_cache.shape[0] * 16, device="cuda")[:tokens]
    qk_bytes = tokens * (heads + kv_heads) * head_dim * size
    return [
        bench_elementwise(
            "rms_norm+residual",
            lambda: (randn(tokens, hidden), weight, 1e-6, randn(tokens, hidden)),
            ops.rms_norm,
            rms_norm_ref,
            4 * tokens * hidden * size,
        ),
        bench_elementwise(
            "silu_and_mul",
            lambda: (randn(tokens, 2 * inter),),
            ops.silu_and_mul,
            silu_and_mul_ref,
            3 * tokens * inter * size,
        ),
        bench_elementwise(
            "apply_rotary",
            lambda: (randn(tokens, heads, head_dim), randn(tokens, kv_heads, head_dim), positions, cos_sin),
            ops.apply_rotary,
            apply_rotary_ref,
            2 * qk_bytes,
        ),
        bench_elementwise(
            "write_kv_cache",
            lambda: (
                randn(tokens, kv_heads, head_dim),
                randn(tokens, kv_heads, head_dim),
                key_cache,
                value_cache,
                slots,
            ),
            ops.write_kv_cache,
            write_kv_cache_ref,
            4 * tokens * kv_heads * head_dim * size,
            reference_graph=False,
        ),
    ]


# (name, N, K, prologue, bias, residual) for each projection of a Qwen2.5-0.5B decoder layer (hidden 896,
# intermediate 4864, 14 heads / 2 KV heads of 64), as the small-batch layer calls fused_linear.
QWEN_05B_PROJECTIONS = [
    ("qkv", 1152, 896, "norm", True, False),
    ("o", 896, 896, None, False, True),
    ("gate_up", 9728, 896, "norm", False, False),
    ("down", 896, 4864, "gate_up", False, True),
]
LINEAR_ROWS = (1, 2, 4, 8)
EPS = 1e-6


def linear_arg_sets(projection: tuple, rows: int) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    """(x, weight, options) sets, enough that the weights cycle through more than L2 holds, as a forward pass reads
    each layer's weights from memory."""
    _, n, k, prologue, with_bias, with_residual = projection

    def randn(*shape):
        return torch.randn(shape, device="cuda", dtype=DTYPE)

    def arg_set():
        x = randn(rows, 2 * k if prologue == "gate_up" else k)
        options = dict(
            bias=randn(n) if with_bias else None,
            norm_weight=randn(k) if prologue == "norm" else None,
            gate_up=prologue == "gate_up",
            residual=randn(rows, n) if with_residual else None,
        )
        return x, randn(n, k) * k**-0.5, options

    return [arg_set() for _ in range(copies(n * k * DTYPE.itemsize))]


def unfused_linear(x, weight, bias=None, norm_weight=None, gate_up=False, residual=None):
    """The model's path before fused_linear: the norm or activation kernel, cuBLAS, the residual add."""
    if norm_weight is not None:
        x = ops.rms_norm(x, norm_weight, EPS)
    if gate_up:
        x = ops.silu_and_mul(x)
    out = F.linear(x, weight, bias)
    return out if residual is None else out + residual


def timed_linear(fn: Callable, arg_sets: list[tuple]) -> float:
    return time_ms(rotating([lambda x=x, w=w, o=o: fn(x, w, **o) for x, w, o in arg_sets]), graph=True)


def bench_linear(projection: tuple, rows: int) -> Case:
    name, n, k = projection[:3]
    arg_sets = linear_arg_sets(projection, rows)
    # cuBLAS on the projection's own input width: the GEMM the fused kernel replaces, without its neighbours.
    gemm_only = [(x[:, :k].contiguous(), w, dict(bias=o["bias"])) for x, w, o in arg_sets]
    return Case(
        "fused_linear",
        f"{name} M={rows} N={n} K={k}",
        timed_linear(functools.partial(ops.fused_linear, eps=EPS), arg_sets),
        {
            "unfused_model_path": timed_linear(unfused_linear, arg_sets),
            "cublas_linear_only": timed_linear(F.linear, gemm_only),
        },
        bytes_moved=n * k * DTYPE.itemsize,
    )


def linear_cases(rows_list: tuple[int, ...]) -> list[Case]:
    return [bench_linear(p, rows) for rows in rows_list for p in QWEN_05B_PROJECTIONS]


def bench_rotary_and_cache(heads: tuple[int, int, int], tokens: int, block_size: int = 16) -> Case:
    """One launch that rotates q and k and writes k and v into the paged cache, against the two launches it
    replaces. q/k/v are views of a fused qkv projection, as in the model."""
    num_heads, kv_heads, head_dim = heads
    qkv_bytes = tokens * (num_heads + 2 * kv_heads) * head_dim * DTYPE.itemsize
    angles = torch.outer(torch.arange(8192, device="cuda").float(), torch.rand(head_dim // 2, device="cuda"))
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    cache_shape = (2 * math.ceil(tokens / block_size), block_size, kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, device="cuda", dtype=DTYPE)
    value_cache = torch.randn_like(key_cache)
    slots = torch.randperm(cache_shape[0] * block_size, device="cuda")[:tokens]
    splits = [num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    views = []
    for _ in range(copies(2 * qkv_bytes)):
        q, k, v = torch.randn(tokens, sum(splits), device="cuda", dtype=DTYPE).split(splits, dim=-1)
        views.append((q.view(tokens, num_heads, head_dim), *(x.view(tokens, kv_heads, head_dim) for x in (k, v))))

    def one_launch(q, k, v):
        return ops.rotary_and_cache(q, k, v, positions, cos_sin, key_cache, value_cache, slots)

    def two_launches(q, k, v):
        q, k = ops.apply_rotary(q, k, positions, cos_sin)
        ops.write_kv_cache(k, v, key_cache, value_cache, slots)
        return q

    def timed(fn):
        return time_ms(rotating([lambda a=a: fn(*a) for a in views]), graph=True)

    return Case(
        "rotary_and_cache",
        f"T={tokens} H={num_heads}/{kv_heads} D={head_dim} bs={block_size}",
        timed(one_launch),
        {"apply_rotary+write_kv_cache": timed(two_launches)},
        bytes_moved=2 * qkv_bytes,  # q, k, v read; q, k, v written
    )


QWEN_05B, LLAMA_8B = (14, 2, 64), (32, 8, 128)


def all_cases(quick: bool) -> list[Callable[[], Case]]:
    decode = [
        (QWEN_05B, 1, 1024),
        (QWEN_05B, 1, 32768),
        (QWEN_05B, 64, 2048),
        (QWEN_05B, 256, 512),
        (LLAMA_8B, 1, 8192),
        (LLAMA_8B, 32, 4096),
        (LLAMA_8B, 128, 1024),
    ]
    if quick:
        decode = decode[:2]
    cases = [lambda d=d: bench_decode(*d) for d in decode]
    cases += [
        lambda: bench_prefill(LLAMA_8B, 4, 1024, 0),
        lambda: bench_prefill(LLAMA_8B, 2, 512, 3584),
        lambda: bench_prefill(QWEN_05B, 8, 512, 0),
    ]
    cases += [lambda: bench_mixed_batch(QWEN_05B, 255, 1024, 512)]
    cases += [lambda: bench_varlen(LLAMA_8B, 4, 1024, True), lambda: bench_varlen((12, 12, 32), 64, 128, False)]
    cases.append(elementwise_cases)
    cases.append(lambda: linear_cases(LINEAR_ROWS[:1] if quick else LINEAR_ROWS))
    cases += [lambda t=t: bench_rotary_and_cache(QWEN_05B, t) for t in (1, 8)]
    cases.append(lambda: bench_rotary_and_cache(LLAMA_8B, 4096))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/kernels-<gpu>.json)")
    parser.add_argument("--quick", action="store_true", help="two decode attention shapes, fused_linear at M=1 only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/ops.py needs a CUDA GPU")
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    print(f"{gpu}: device copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    cases: list[Case] = []
    for make in all_cases(args.quick):
        made = make()
        for case in made if isinstance(made, list) else [made]:
            if case.kernel in ("paged_decode_attention", "fused_linear"):
                case.extra["fraction_of_copy_bandwidth"] = case.gbs() / copy_gbs
            cases.append(case)
            report(case)
            torch.cuda.empty_cache()

    out = args.out or Path(__file__).parent / "results" / f"kernels-{gpu.lower().replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python3 " + " ".join(sys.argv),
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": str(DTYPE),
        "copy_bandwidth_gbs": copy_gbs,
        "cases": [{**asdict(c), "speedups": c.speedups(), "gbs": c.gbs() if c.bytes_moved else None} for c in cases],
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


def report(case: Case) -> None:
    ratios = "  ".join(f"{ratio:6.2f}x vs {name}" for name, ratio in case.speedups().items())
    figures = ""
    if case.bytes_moved:
        figures = f"{case.gbs():7.0f} GB/s"
        if "fraction_of_copy_bandwidth" in case.extra:
            figures += f" ({case.extra['fraction_of_copy_bandwidth']:.0%} of copy)"
    elif case.flops:
        figures = f"{case.flops / case.triton_ms / 1e9:7.1f} TFLOP/s"
    print(f"{case.kernel:24} {case.shape:52} {case.triton_ms * 1e3:9.1f} us  {figures:26} {ratios}", flush=True)


if __name__ == "__main__":
    main()
