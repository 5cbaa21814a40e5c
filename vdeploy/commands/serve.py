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
from vdeploy.settings import SETTINGS, Setting

# Flags of `vdeploy serve` itself; every other flag is a setting of vdeploy/settings.py.
_SERVE_ONLY = {"command", "func", "model", "api_key", "disable_custom_all_reduce"}
_TYPES = {"str": str, "int": int, "float": float}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model in the foreground (vllm serve's flags)", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("model", help="local HF dir, GGUF file, HF hub id or modelscope:<id>")
    for setting in SETTINGS:
        if setting.flag is not None:
            parser.add_argument(*_names(setting), dest=setting.name, help=setting.help, **_argument(setting))
    parser.add_argument(
        "--disable-custom-all-reduce",
        action="store_true",
        help="accepted for vLLM compatibility; the built-in engine always uses NCCL's all-reduce",
    )
    parser.add_argument("--api-key", help="require this key (Authorization: Bearer KEY); default: none")
    parser.add_argument("--task", help=argparse.SUPPRESS)  # removed in vLLM; the compiler explains the replacement
    parser.set_defaults(func=run)


def engine_arguments(args: argparse.Namespace) -> dict:
    """The settings given on the command line (None: not given, the compiler decides)."""
    return {k: v for k, v in vars(args).items() if k not in _SERVE_ONLY and v is not None}


def _names(setting: Setting) -> list[str]:
    return [setting.flag, setting.short] if setting.short else [setting.flag]


def _argument(setting: Setting) -> dict:
    """argparse keywords for a setting; every default is None, "not given", so the compiler decides."""
    if setting.kind == "bool":
        return {"action": "store_true", "default": None}
    if setting.kind == "switch":
        return {"action": argparse.BooleanOptionalAction, "default": None}
    return {"type": _TYPES[setting.kind], "choices": setting.choices}


def run(args: argparse.Namespace) -> int:
    from vdeploy.compiler import PlanError, plan_from_args

    color = use_color(sys.stderr)
    try:
        plan = plan_from_args(args.model, **engine_arguments(args))
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
