"""`vdeploy serve MODEL [flags]`: vLLM's `vllm serve` with the same flags, through the same compiler as `vdeploy lint`.

The flags become an implicit recipe (`plan_from_args`); any error diagnostic ends the command with status 1 before
anything is loaded (so `--dtype bfloat16` on a T4 fails at once). Then the built-in server runs in the foreground.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vdeploy.backends.builtin import argv as builtin_argv
from vdeploy.diagnostics import format_diagnostics, use_color
from vdeploy.plan import Plan

# Flags that do not become recipe fields.
_SERVE_ONLY = {"command", "func", "model", "api_key", "disable_custom_all_reduce"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model in the foreground (vllm serve's flags)", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("model", help="local HF dir, GGUF file, HF hub id or modelscope:<id>")
    parser.add_argument("--served-model-name", help="the model name clients use (default: MODEL)")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the largest that fits)")
    parser.add_argument("--max-num-seqs", type=int, help="most sequences in a batch")
    parser.add_argument("--max-num-batched-tokens", type=int, help="most tokens in one engine step")
    parser.add_argument("--gpu-memory-utilization", type=float, help="fraction of each GPU's memory to use")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, help="GPUs that split each layer")
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, help="GPUs that split the layers")
    parser.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
    parser.add_argument("--swap-space", type=float, help="GiB of CPU memory for swapped-out KV blocks")
    parser.add_argument("--cpu-offload-gb", type=float, help="GiB of weights to keep in CPU memory")
    parser.add_argument("--dtype", help="auto, float16, bfloat16 or float32")
    parser.add_argument("--quantization", "-q", help="gguf, awq, gptq, fp8 ...")
    parser.add_argument("--block-size", type=int, help="tokens per KV cache block")
    parser.add_argument("--runner", choices=["generate", "pooling"], help="generate (default) or pooling")
    parser.add_argument("--convert", choices=["auto", "embed", "reward", "classify"], help="for --runner pooling")
    parser.add_argument("--trust-remote-code", action="store_true", default=None, help="run the model repo's code")
    parser.add_argument(
        "--disable-custom-all-reduce",
        action="store_true",
        help="accepted for vLLM compatibility; the built-in engine always uses NCCL's all-reduce",
    )
    parser.add_argument("--distributed-executor-backend", choices=["mp", "ray"], help="how ranks are started")
    parser.add_argument("--download-dir", help="where hub downloads go (default: the HF cache)")
    parser.add_argument("--hardware", help="hardware profile name, or auto (default) to detect")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--host", help="address to listen on")
    parser.add_argument("--port", type=int, help="port to listen on")
    parser.add_argument("--api-key", help="require this key (Authorization: Bearer KEY); default: none")
    parser.add_argument("--api-key-env", help="environment variable that holds the API key")
    parser.add_argument("--chat-template", help="a Jinja chat template file or inline template")
    parser.add_argument("--task", help=argparse.SUPPRESS)  # removed in vLLM; the compiler explains the replacement
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vdeploy.compiler import PlanError, plan_from_args

    engine_args = {k: v for k, v in vars(args).items() if k not in _SERVE_ONLY and v is not None}
    color = use_color(sys.stderr)
    try:
        plan = plan_from_args(args.model, **engine_args)
    except PlanError as error:
        print(format_diagnostics(error.diagnostics, "text", color=color), file=sys.stderr)
        return 1
    warnings = [d for d in plan.diagnostics if d.severity == "warning"]
    if warnings:
        print(format_diagnostics(warnings, "text", color=color), file=sys.stderr)
    return _exec_engine_server(plan, args.api_key)


def _exec_engine_server(plan: Plan, api_key: str | None) -> int:
    """Replaces this process with the engine's server on the plan, so signals and the exit status are the server's.
    The control plane starts the engine as a program, never imports it (docs/DESIGN.md, "Import rules")."""
    import os
    import tempfile

    folder = Path(tempfile.gettempdir()) / f"vdeploy-serve-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    plan_path = folder / f"{plan.engine.name}.{os.getpid()}.json"
    plan_path.write_text(plan.model_dump_json(), encoding="utf-8")
    argv = builtin_argv(str(plan_path), plan.engine.host, plan.engine.port)
    if api_key:
        argv += ["--api-key", api_key]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
