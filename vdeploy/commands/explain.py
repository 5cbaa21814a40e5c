"""`vdeploy explain FILE`: every decision the compiler made for each recipe in FILE, and why, for a person."""

from __future__ import annotations

import argparse
import sys

from vdeploy.commands.plan import add_file_arguments, plan_file, plan_text
from vdeploy.diagnostics import format_diagnostics, has_errors


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("explain", help="explain each decision in a recipe's plan", description=__doc__)
    add_file_arguments(parser)
    parser.set_defaults(func=run)


def value_text(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def run(args: argparse.Namespace) -> int:
    results = plan_file(args.file, args.name)
    if not results:
        print(f"vdeploy explain: no recipe named {args.name!r} in {args.file}", file=sys.stderr)
        return 1
    blocks = []
    for result in results:
        lines = []
        if result.plan is not None:
            lines.append(plan_text(result.plan))
            lines.append("\ndecisions (what the recipe left open, and why the compiler chose it)")
            width = max((len(d.field) for d in result.plan.decisions), default=0)
            lines += [f"  {d.field:<{width}}  {value_text(d.value)}\n  {'':<{width}}  because {d.reason}"
                      for d in result.plan.decisions]
        if result.diagnostics:
            lines.append("\nfindings")
            lines.append(format_diagnostics(result.diagnostics, "text"))
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return 1 if any(has_errors(r.diagnostics) for r in results) else 0
