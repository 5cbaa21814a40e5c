"""`vdeploy explain FILE`: every decision the compiler made for each recipe in FILE, and why, for a person."""

from __future__ import annotations

import argparse
import sys

from vdeploy.commands.output import add_output_argument, emit
from vdeploy.commands.plan import PlannedRecipe, add_file_arguments, plan_file, plan_json, plan_text
from vdeploy.diagnostics import format_diagnostics, has_errors


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("explain", help="explain each decision in a recipe's plan", description=__doc__)
    add_file_arguments(parser)
    add_output_argument(parser)
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
    if args.output in ("json", "yaml"):
        objects = [plan_json(r) for r in results]
        emit(objects[0] if len(objects) == 1 else objects, args.output)
    else:
        print("\n\n".join(explain_text(r, wide=args.output == "wide") for r in results))
    return 1 if any(has_errors(r.diagnostics) for r in results) else 0


def explain_text(result: PlannedRecipe, wide: bool = False) -> str:
    lines = []
    if result.plan is not None:
        lines.append(plan_text(result.plan))
        lines.append("\ndecisions (what the recipe left open, and why the compiler chose it)")
        width = max((len(d.field) for d in result.plan.decisions), default=0)
        lines += [f"  {d.field:<{width}}  {value_text(d.value)}\n  {'':<{width}}  because {d.reason}"
                  for d in result.plan.decisions]
    if wide and result.source is not None:
        lines.append("\nset by the recipe (file:line)")
        leaves = [path for path in result.source.positions
                  if path and not any(len(q) > len(path) and q[: len(path)] == path for q in result.source.positions)]
        width = max((len(".".join(map(str, path))) for path in leaves), default=0)
        lines += [f"  {'.'.join(map(str, path)):<{width}}  {result.source.file}:{result.source.positions[path][0]}"
                  for path in leaves]
    if result.diagnostics:
        lines.append("\nfindings")
        lines.append(format_diagnostics(result.diagnostics, "text"))
    return "\n".join(lines)
