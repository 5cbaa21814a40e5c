"""What each stage of a batch-1 decode step costs on the GPU, by ablation: the decode graph is captured again with one
kind of kernel left out (its output left unwritten, so the tokens are garbage but the timing holds), and a stage's cost
is how much shorter one replay of the step gets. With programmatic dependent launch the kernels overlap, so a
kernel's own duration in a profile no longer says what it costs the step; its removal does.

    python3 bench/decode_stages.py [--shape qwen2.5-0.5b] [--output-json bench/results/decode-stages-<gpu>.json]

Each stage's cost is printed per layer beside the time its weights take at the card's copy bandwidth (the floor).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_bench import (  # noqa: E402
    SHAPES,
    copy_bandwidth,
    free_gpu,
    graph_replay_seconds,
    write_random_model,
    write_report,
)


def projections(shape: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Decode projection name -> weight shape (N, K)."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * head_dim
    return {"qkv": (qkv, hidden), "o": (hidden, hidden), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}


def step_seconds(model_dir: Path, skip: str | None, shape: dict[str, Any]) -> float:
    """One batch-1 decode graph replay with the stage `skip` left out (None: the whole step)."""
    import torch

    from vdeploy_engine import LLM, SamplingParams
    from vdeploy_kernels import ops

    saved = {name: getattr(ops, name) for name in ("fused_linear", "rotary_decode_attention")}
    skipped_weights = {projections(shape)[skip]} if skip in projections(shape) else set()

    def fused_linear(x, weight, bias=None, *, residual=None, **kwargs):
        if tuple(weight.shape) in skipped_weights:
            unwritten = torch.empty((len(x), weight.shape[0]), dtype=x.dtype, device=x.device)
            return residual if residual is not None else unwritten
        return saved["fused_linear"](x, weight, bias, residual=residual, **kwargs)

    ops.fused_linear = fused_linear
    if skip == "attention":  # with rotary and the KV-cache write, which a decode step does inside it
        ops.rotary_decode_attention = lambda q, *args: q
    try:
        llm = LLM(str(model_dir), dtype="bfloat16", max_num_seqs=8, max_model_len=2048)
        llm.generate([list(range(2, 130))], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        seconds = graph_replay_seconds(llm)
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)
    del llm
    free_gpu()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args()

    import torch

    import vdeploy_kernels.launch

    shape = SHAPES[args.shape]
    layers = shape["num_hidden_layers"]
    bandwidth = copy_bandwidth()
    report: dict[str, Any] = dict(
        command="python3 " + shlex.join(sys.argv),
        gpu=torch.cuda.get_device_name(),
        pdl=vdeploy_kernels.launch.pdl(torch.empty(0, device="cuda")),
        copy_bytes_per_s=round(bandwidth),
        stages={},
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_random_model(args.shape, Path(tmp) / args.shape)
        whole = step_seconds(model_dir, None, shape)
        report["step_us"] = round(whole * 1e6, 1)
        print(f"[{args.shape}] whole step {whole * 1e6:.1f} us", flush=True)
        weights = {name: 2 * n * k for name, (n, k) in projections(shape).items()}
        for stage in [*weights, "attention"]:
            per_layer = (whole - step_seconds(model_dir, stage, shape)) / layers
            floor = weights.get(stage, 0) / bandwidth
            report["stages"][stage] = dict(us_per_layer=round(per_layer * 1e6, 2), floor_us=round(floor * 1e6, 2))
            print(f"[{args.shape}] {stage}: {per_layer * 1e6:.2f} us a layer (weights at copy bandwidth: "
                  f"{floor * 1e6:.2f} us)", flush=True)
    write_report(report, args.output_json)


if __name__ == "__main__":
    main()
