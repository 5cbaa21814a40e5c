"""`vdeploy serve MODEL [flags]`: vLLM's `vllm serve` with the same flags, through the same compiler as `vdeploy lint`.

The flags become an implicit recipe (`plan_from_args`); any error diagnostic ends the command with status 1 before
anything is loaded (so `--dtype bfloat16` on a T4 fails at once). Then the built-in server runs in the foreground.
Every other `vllm serve` flag is in vdeploy/vllm_flags.py: refused by name with the reason, or accepted with a
warning saying why it changes nothing. `--config FILE` reads flags from vLLM's YAML (the command line wins), and the
server takes its API key from --api-key or, as vLLM, from VLLM_API_KEY.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vdeploy.backends.builtin import argv as builtin_argv
from vdeploy.diagnostics import format_diagnostics, use_color
from vdeploy.plan import Plan
from vdeploy.settings import SETTINGS, Setting
from vdeploy.vllm_flags import FLAGS

# Flags of `vdeploy serve` itself; every other flag is a setting of vdeploy/settings.py or in vdeploy/vllm_flags.py.
_SERVE_ONLY = {"command", "func", "model", "api_key", "config", "serve_parser"}
_TABLE_PREFIX = "vllm_flag:"  # argparse dests of the vllm_flags.py flags
_TYPES = {"str": str, "int": int, "float": float}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model in the foreground (vllm serve's flags)", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("model", help="local HF dir, GGUF file, HF hub id or modelscope:<id>")
    for setting in SETTINGS:
        if setting.flag is not None:
            parser.add_argument(*_names(setting), dest=setting.name, help=setting.help, **_argument(setting))
    for flag in FLAGS:
        names = [flag.flag, flag.short] if flag.short else [flag.flag]
        help = f"{'not supported' if flag.status == 'refused' else 'ignored'}: {flag.why}"
        parser.add_argument(*names, dest=_TABLE_PREFIX + flag.flag, help=help, **_ARITY[flag.arity])
    parser.add_argument(
        "--api-key", help="require this key (Authorization: Bearer KEY); default: the VLLM_API_KEY variable, else none"
    )
    parser.add_argument("--config", help="a YAML file of flags, as vLLM's (flags on the command line win)")
    parser.add_argument("--task", help=argparse.SUPPRESS)  # removed in vLLM; the compiler explains the replacement
    parser.set_defaults(func=run, serve_parser=parser)


_ARITY = {
    "value": {},
    "bool": {"action": "store_true", "default": None},
    "switch": {"action": argparse.BooleanOptionalAction, "default": None},
}


def engine_arguments(args: argparse.Namespace) -> dict:
    """The settings given on the command line (None: not given, the compiler decides)."""
    return {
        k: v
        for k, v in vars(args).items()
        if k not in _SERVE_ONLY and not k.startswith(_TABLE_PREFIX) and v is not None
    }


def vllm_flag_problems(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(errors, warnings) for the vllm_flags.py flags given: a refused flag is an error naming it and why."""
    errors, warnings = [], []
    for flag in FLAGS:
        value = getattr(args, _TABLE_PREFIX + flag.flag, None)
        if value is None or value is False and flag.arity == "bool":
            continue
        if flag.status == "ignored":
            warnings.append(f"{flag.flag} is accepted and ignored: {flag.why}")
        elif str(value) not in flag.accepts:
            shown = flag.flag if flag.arity != "value" else f"{flag.flag} {value}"
            also = f" (accepted: {', '.join(flag.accepts)})" if flag.accepts else ""
            errors.append(f"{shown} is not supported by the built-in engine: {flag.why}{also}")
    return errors, warnings


def with_config_file(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the flags not given on the command line from --config's YAML (vLLM's format: flag names without the
    dashes as keys). Raises ValueError naming the file and what is wrong."""
    import json

    import yaml

    path = args.config
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as error:
        raise ValueError(f"--config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: must be a mapping of flag names to values")
    argv = [args.model]
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if key == "model" or value is None:
            continue
        if value is True:
            argv.append(flag)
        elif value is False:  # --no-FLAG for a switch; a plain flag is off when absent
            if "--no-" + flag[2:] in args.serve_parser._option_string_actions:
                argv.append("--no-" + flag[2:])
        else:
            argv += [flag, json.dumps(value) if isinstance(value, list | dict) else str(value)]
    from_file, unknown = _parse_known(args.serve_parser, argv)
    if unknown:
        raise ValueError(f"--config {path}: not a vllm serve flag: {' '.join(u for u in unknown if u.startswith('-'))}")
    for key, value in vars(from_file).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def _parse_known(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """parse_known_args, with an unparsable value (or a --no- form of a plain flag) counted as unknown rather than
    ending the program."""
    try:
        return parser.parse_known_args(argv)
    except SystemExit:
        raise ValueError(f"cannot read the flags {' '.join(argv[1:])}") from None


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
        if args.config is not None:
            args = with_config_file(args)
    except ValueError as error:
        print(f"vdeploy serve: {error}", file=sys.stderr)
        return 1
    errors, warnings = vllm_flag_problems(args)
    for message in warnings:
        print(f"vdeploy serve: warning: {message}", file=sys.stderr)
    if errors:
        for message in errors:
            print(f"vdeploy serve: {message}", file=sys.stderr)
        return 1
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
