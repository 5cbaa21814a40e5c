"""`vdeploy` command line: one subcommand per module in `vdeploy/commands/`.

Each module in COMMANDS exposes `register(subparsers) -> None`, which adds its parser and sets `func(args) -> int`
(the exit code). Command modules are imported at start-up, so they must keep torch, triton and transformers out of
their module level (import them inside the function that needs them): `vdeploy lint` runs on machines without them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vdeploy import __version__

COMMANDS = ["lint", "plan", "explain", "schema", "profiles", "serve", "apply", "status", "logs", "delete", "rollout", "render"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdeploy", description="Declarative, OOM-safe deployments of LLM inference servers."
    )
    parser.add_argument("--version", action="version", version=f"vdeploy {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"vdeploy.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `vdeploy plan ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
