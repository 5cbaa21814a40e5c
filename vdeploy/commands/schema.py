"""`vdeploy schema`: the recipe's JSON Schema, for editors (yaml-language-server) and CI validators."""

from __future__ import annotations

import argparse
import json

from vdeploy.recipe import json_schema


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("schema", help="print the recipe JSON Schema", description=__doc__)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0
