"""Tile sweep for kernels.fused_linear on the GPU: for each decode projection of the benchmark models, every
(BLOCK_N, BLOCK_K, num_warps) against what kernels/linear.py's _linear_config picks and against the unfused torch path
(cuBLAS GEMM plus the separate norm / activation / add kernels), timed as CUDA-graph replays over weight copies that
exceed the L2 cache (as a model's layers do).

    python3 bench/fused_linear_tiles.py [--rows 1,4] [--models qwen2.5-0.5b] [--projections down]
        [--out bench/results/fused-linear-tiles-<gpu>.json]

Prints, per shape, the best tiles, the default's time and bandwidth (weight bytes / time, against the card's copy
bandwidth measured in the same run), so _linear_config can be set from data.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import shlex
import sys
from pathlib import Path

import torch
from triton import next_power_of_2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernels import copies, copy_bandwidth_gbs, rotating, time_ms  # noqa: E402
from vdeploy_kernels.linear import _linear_config, fused_linear_ref, fused_linear_triton  # noqa: E402

# (name, K, N, prologue, bias, residual) per projection; prologue is "norm", "gate_up" or None.
MODELS = {
    "qwen2.5-0.5b": [
        ("qkv", 896, 1152, "norm", True, False),
        ("o", 896, 896, None, False, True),
        ("gate_up", 896, 9728, "norm", False, False),
        ("down", 4864, 896, "gate_up", False, True),
    ],
    "smollm2-135m": [
        ("qkv", 576, 960, "norm", False, False),
        ("o", 576, 576, None, False, True),
        ("gate_up", 576, 3072, "norm", False, False),
        ("down", 1536, 576, "gate_up", False, True),
    ],
}
TILES = list(itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048, 4096, 8192), (2, 4, 8, 16)))


def sweep_shape(m: int, k: int, n: int, prologue: str | None, bias: bool, residual: bool) -> dict:
    dt = torch.bfloat16
    weight_bytes = n * k * dt.itemsize
    sets = []
    for _ in range(copies(weight_bytes)):
        x = torch.randn(m, 2 * k if prologue == "gate_up" else k, device="cuda", dtype=dt)
        args = dict(
            bias=torch.randn(n, device="cuda", dtype=dt) if bias else None,
            norm_weight=torch.randn(k, device="cuda", dtype=dt) if prologue == "norm" else None,
            gate_up=prologue == "gate_up",
            residual=torch.randn(m, n, device="cuda", dtype=dt) if residual else None,
        )
        sets.append((x, torch.randn(n, k, device="cuda", dtype=dt) / k**0.5, args))

    def timed(fn) -> float:
        return time_ms(rotating([lambda s=s: fn(s[0], s[1], **s[2]) for s in sets]), graph=True, budget_ms=60)

    unfused = timed(fused_linear_ref)  # on CUDA the references are cuBLAS plus torch's elementwise kernels
    x, w, a = sets[0]
    want = fused_linear_ref(x, w, **a).float()
    results = []
    for block_n, block_k, warps in TILES:
        if block_n * block_k * next_power_of_2(m) > 32768 or block_k > max(256, next_power_of_2(k)):
            continue
        tiled = functools.partial(fused_linear_triton, block_n=block_n, block_k=block_k, num_warps=warps)
        if not torch.allclose(tiled(x, w, **a).float(), want, atol=0.1, rtol=0.05):
            raise AssertionError(f"wrong result with {tiled.keywords}")
        results.append((timed(tiled), tiled.keywords))
    best_ms, best = min(results, key=lambda r: r[0])
    default = dict(zip(("block_n", "block_k", "num_warps"), _linear_config(m, n, k), strict=True))
    default_ms = timed(fused_linear_triton)
    return dict(
        weight_bytes=weight_bytes,
        unfused_ms=round(unfused, 5),
        default=default,
        default_ms=round(default_ms, 5),
        best=best,
        best_ms=round(best_ms, 5),
        top5=[dict(ms=round(ms, 5), **tiles) for ms, tiles in sorted(results, key=lambda r: r[0])[:5]],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1", help="batch sizes (rows of x) to sweep")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--projections", default="qkv,o,gate_up,down")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    report = dict(command="python3 " + shlex.join(sys.argv), gpu=torch.cuda.get_device_name(), copy_gbs=copy_gbs)
    rows = []
    for m in map(int, args.rows.split(",")):
        for model in args.models.split(","):
            for name, k, n, prologue, bias, residual in MODELS[model]:
                if name not in args.projections.split(","):
                    continue
                r = sweep_shape(m, k, n, prologue, bias, residual)
                r.update(model=model, projection=name, rows=m, k=k, n=n)
                rows.append(r)
                fraction = {key: r["weight_bytes"] / r[key] / 1e6 / copy_gbs for key in ("default_ms", "best_ms")}
                print(
                    f"{model:13} {name:8} M={m} K={k:5} N={n:5}  unfused {r['unfused_ms'] * 1e3:6.1f} us  "
                    f"default {r['default_ms'] * 1e3:6.1f} us ({fraction['default_ms']:4.0%})  "
                    f"best {r['best_ms'] * 1e3:6.1f} us ({fraction['best_ms']:4.0%}) {r['best']}",
                    flush=True,
                )
    report["shapes"] = rows
    out = args.out or Path(__file__).parent / "results" / (
        "fused-linear-tiles-" + torch.cuda.get_device_name().split()[-1].lower() + ".json"
    )
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
