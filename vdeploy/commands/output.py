"""The `-o/--output` flag every read command shares (kubectl's habit): text for people, json and yaml for programs,
wide for a text table with more columns."""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

FORMS = ("text", "json", "yaml", "wide")


def add_output_argument(parser: argparse.ArgumentParser, forms: tuple[str, ...] = FORMS) -> None:
    parser.add_argument("-o", "--output", "--format", dest="output", choices=forms, default="text",
                        help=f"output format: {', '.join(forms)} (default: text)")


def emit(data: Any, form: str) -> None:
    """Print `data` as JSON or YAML (the same document either way)."""
    if form == "yaml":
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip())
    else:
        print(json.dumps(data, indent=2))
