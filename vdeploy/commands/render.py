"""`vdeploy render FILE --target builtin|vllm|systemd|k8s`: the plan as a command line, a systemd unit or Kubernetes
manifests, for running it without vdeploy's supervisor or under another one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUFFIXES = {"builtin": ".sh", "vllm": ".sh", "systemd": ".service", "k8s": ".yaml"}


def register(subparsers: argparse._SubParsersAction) -> None:
    from vdeploy.render import TARGETS

    parser = subparsers.add_parser(
        "render", help="render a recipe for another engine or supervisor", description=__doc__
    )
    parser.add_argument("path", help="a recipe file, or a folder of them")
    parser.add_argument("--target", choices=TARGETS, required=True)
    parser.add_argument("-o", "--output", help="write one file per deployment into this folder (default: stdout)")
    parser.add_argument("--image", help="container image for --target k8s")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from vdeploy.commands.apply import checked_plans
    from vdeploy.render import RenderError, render

    plans = checked_plans(args.path)
    if plans is None:
        return 1
    recipe = args.path if len(plans) == 1 and Path(args.path).is_file() else None
    output = Path(args.output) if args.output else None
    documents = []
    for plan in plans:
        plan_path = str((output / f"{plan['name']}.plan.json").resolve()) if output else None
        try:
            text = render(plan, args.target, recipe_path=recipe, plan_path=plan_path, image=args.image)
        except RenderError as e:
            print(f"render: {e}", file=sys.stderr)
            return 1
        if output is None:
            documents.append(text)
            continue
        output.mkdir(parents=True, exist_ok=True)
        if args.target == "builtin":  # the builtin engine reads its plan from this file
            Path(plan_path).write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n")
        target_file = output / f"{plan['name']}{SUFFIXES[args.target]}"
        target_file.write_text(text)
        print(f"wrote {target_file}")
    if documents:
        separator = "---\n" if args.target == "k8s" else "\n"
        sys.stdout.write(separator.join(documents))
    return 0
