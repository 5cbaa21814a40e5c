"""`vdeploy` command line: one subcommand per module in `vdeploy/commands/`.

Each module in COMMANDS exposes `register(subparsers) -> None`, which adds its parser and sets `func(args) -> int`
(the exit code). Only the invoked command's module is imported (all of them for `vdeploy --help`), so one command's
dependencies never slow another down; still, keep torch, triton and transformers out of module level (import them
inside the function that needs them): `vdeploy lint` runs on machines without them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vdeploy import __version__

COMMANDS = ["lint", "plan", "explain", "schema", "profiles", "serve", "apply", "status", "logs", "delete", "rollout", "render"]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command`'s subparser registered, or every command's when None."""
    parser = argparse.ArgumentParser(
        prog="vdeploy", description="Declarative, OOM-safe deployments of LLM inference servers."
    )
    parser.add_argument("--version", action="version", version=f"vdeploy {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS if command is None else [command]:
        importlib.import_module(f"vdeploy.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `vdeploy plan ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
