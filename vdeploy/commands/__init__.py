"""Subcommands of the `vdeploy` CLI; `vdeploy/cli.py` lists them. Each module exposes `register(subparsers)`."""
