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

COMMANDS = ["lint", "plan", "explain", "schema", "profiles", "serve", "apply", "status", "logs", "delete", "rollout",
            "render", "completion", "pull"]

EPILOG = """examples:
  vdeploy lint recipes/                                   check every recipe in a folder (exit 1 on errors)
  vdeploy plan recipe.yaml --sweep memory.max_model_len=2048..32768   what fits, before anything runs
  vdeploy apply recipe.yaml                               roll it out; the old revision serves until the new is ready
  vdeploy rollout status NAME                             wait for the rollout to end (exit 0 done, 1 failed)
  vdeploy status -o wide --watch
  source <(vdeploy completion bash)                       tab completion (also zsh, fish)

environment:
  VDEPLOY_STATE_DIR      the state directory (default: $XDG_STATE_HOME/vdeploy, else ~/.local/state/vdeploy)
  XDG_STATE_HOME         see VDEPLOY_STATE_DIR
  VDEPLOY_PROFILE_PATH   extra hardware-profile folders, ':'-separated; they override shipped profiles
  HF_HOME, HF_HUB_CACHE  the Hugging Face cache model facts are read from (default ~/.cache/huggingface/hub)
  HF_ENDPOINT, HF_TOKEN  the hub the engine (and `vdeploy pull`) downloads from, and its token
  VDEPLOY_CACHE_DIR      the engine's cache (converted GGUF tokenizers; default $XDG_CACHE_HOME/vdeploy)
  VDEPLOY_LOG_LEVEL      the engine's log level (default INFO)
  NO_COLOR               no colour in diagnostics, even on a terminal
"""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command`'s subparser registered, or every command's when None."""
    parser = argparse.ArgumentParser(
        prog="vdeploy", description="Declarative, OOM-safe deployments of LLM inference servers.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
