"""`vdeploy lint PATH...`: check recipes (files, folders, globs) without touching a GPU. Exit 1 on errors."""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

from vdeploy.diagnostics import CODES, FORMATS, Diagnostic, error, format_diagnostics, use_color
from vdeploy.recipe import load_recipes

RECIPE_SUFFIXES = (".yaml", ".yml")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("lint", help="check recipes: schema, hardware, model, memory", description=__doc__)
    parser.add_argument("paths", nargs="*", metavar="PATH", help="recipe files, folders (searched for *.yaml) or globs")
    parser.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    parser.add_argument("--codes", action="store_true", help="list the diagnostic codes and exit")
    parser.set_defaults(func=run)


def expand(paths: list[str]) -> tuple[list[Path], list[Diagnostic]]:
    """Recipe files named by paths, folders and globs, in a stable order; a path that matches nothing is an error."""
    files: list[Path] = []
    problems = []
    for raw in paths:
        matches = [Path(m) for m in sorted(glob.glob(raw, recursive=True))] if glob.has_magic(raw) else [Path(raw)]
        if not matches or not matches[0].exists():
            problems.append(error("VD011", f"no such file or folder: {raw}").model_copy(update={"file": raw}))
            continue
        for match in matches:
            if match.is_dir():
                files += sorted(p for p in match.rglob("*") if p.suffix in RECIPE_SUFFIXES and p.is_file())
            else:
                files.append(match)
    return list(dict.fromkeys(files)), problems


def lint_paths(paths: list[str]) -> tuple[list[Diagnostic], int]:
    """All diagnostics for the recipes under `paths`, and how many recipes were checked."""
    from vdeploy.compiler import plan_recipe

    files, diagnostics = expand(paths)
    checked = 0
    for file in files:
        for document in load_recipes(file):
            diagnostics += document.diagnostics
            if document.recipe is not None:
                checked += 1
                diagnostics += plan_recipe(document.recipe, document.source)[1]
    return diagnostics, checked


def run(args: argparse.Namespace) -> int:
    if args.codes:
        print("\n".join(f"{code}  {text}" for code, text in CODES.items()))
        return 0
    if not args.paths:
        print("vdeploy lint: give at least one PATH (a recipe file, folder or glob)", file=sys.stderr)
        return 2
    diagnostics, checked = lint_paths(args.paths)
    shown = [d for d in diagnostics if d.severity != "info" or args.format != "text"]
    if shown or args.format != "text":
        print(format_diagnostics(shown, args.format, color=use_color()))
    errors = sum(d.severity == "error" for d in diagnostics)
    warnings = sum(d.severity == "warning" for d in diagnostics)
    if args.format == "text":
        print(f"{checked} recipe(s) checked: {errors} error(s), {warnings} warning(s)", file=sys.stderr)
    return 1 if errors or (args.strict and warnings) else 0
