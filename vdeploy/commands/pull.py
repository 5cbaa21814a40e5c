"""`vdeploy pull MODEL|RECIPE`: fetch a model's weights into the cache the engine reads, before any replica needs them.

MODEL is a hub id (`Qwen/Qwen2.5-0.5B-Instruct`) or `modelscope:<id>`; a RECIPE file pulls the model of each recipe in
it and checks the files against the facts its plan was made from. Downloads resume where they stopped. `apply` runs
this first for every model that is not on the machine yet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vdeploy.commands.output import add_output_argument, emit

EXAMPLES = """examples:
  vdeploy pull Qwen/Qwen2.5-0.5B-Instruct
  vdeploy pull recipes/qwen2.5-7b-instruct-tp2.yaml     the model of each recipe in the file
  HF_ENDPOINT=https://hf-mirror.com vdeploy pull Qwen/Qwen2.5-7B-Instruct
  vdeploy pull modelscope:qwen/Qwen2.5-0.5B-Instruct    needs the modelscope package

environment:
  HF_ENDPOINT     the hub to download from (default https://huggingface.co)
  HF_HOME         the cache (default ~/.cache/huggingface; HF_HUB_CACHE names its hub/ folder directly)
  HF_TOKEN        a token for gated or private models
  HF_HUB_OFFLINE  1: use only what is already in the cache
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pull", help="download a model's weights ahead of apply", description=__doc__,
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL|RECIPE", help="a hub id, modelscope:<id>, or a recipe file")
    parser.add_argument("--revision", help="a branch, tag or commit (default: the recipe's, else main)")
    parser.add_argument("--name", help="only the recipe with this name (when RECIPE holds several)")
    add_output_argument(parser, ("text", "json"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vdeploy.commands.progress import PhaseView
    from vdeploy.pull import PullError

    targets = _targets(args)
    if targets is None:
        return 1
    view = PhaseView(args.output)
    results = []
    try:
        for model, revision, planned in targets:
            try:
                results.append(pull_checked(model, revision, planned, view))
            except PullError as e:
                results.append({"model": model, "action": "failed", "reason": str(e)})
    finally:
        view.close()
    if args.output == "json":
        emit(results, "json")
    for r in results if args.output == "text" else []:
        if r["action"] == "failed":
            print(f"{r['model']}: failed: {r['reason']}", file=sys.stderr)
        else:
            size = f", {r['checkpoint_bytes'] / (1 << 30):.2f} GiB of weights" if r.get("checkpoint_bytes") else ""
            print(f"{r['model']}: {r['action']} at {r['path']} ({r['architecture']}{size})")
    return 1 if any(r["action"] == "failed" for r in results) else 0


def pull_checked(model: str, revision: str | None, planned: Any, view: Any, download_dir: str | None = None
                 ) -> dict[str, Any]:
    """Pull one model (showing its progress in `view`) and check it against the `planned` facts."""
    from vdeploy.pull import check_pulled, needs_pull, pull

    if not needs_pull(model):
        return {"model": model, "action": "already local", "path": model,
                "architecture": planned.architecture if planned else "unknown"}
    fields = {"event": "pull", "model": model}
    path = pull(model, revision, download_dir, on_event=lambda event: view.show(f"pull {model}", event, fields))
    facts = check_pulled(model, path, planned)
    return {"model": model, "action": "pulled", "path": str(path), "architecture": facts.architecture,
            "checkpoint_bytes": facts.checkpoint_bytes}


def _targets(args: argparse.Namespace) -> list[tuple[str, str | None, Any]] | None:
    """(model, revision, the facts planned before the pull) for MODEL, or for each recipe of RECIPE."""
    from vdeploy.modelinfo import resolve_model

    if not args.model.endswith((".yaml", ".yml")):
        return [(args.model, args.revision, resolve_model(args.model, args.revision)[0])]
    from vdeploy.diagnostics import format_text, has_errors
    from vdeploy.recipe import load_recipes

    if not Path(args.model).is_file():
        print(f"pull: no such recipe file: {args.model}", file=sys.stderr)
        return None
    documents = load_recipes(args.model)
    problems = [d for doc in documents for d in doc.diagnostics]
    if has_errors(problems):
        print(format_text(problems), file=sys.stderr)
        return None
    recipes = [d.recipe for d in documents if args.name is None or d.recipe.deployment_name == args.name]
    return [(r.model, args.revision or r.revision, resolve_model(r.model, args.revision or r.revision)[0])
            for r in recipes]
