"""`vdeploy plan FILE --sweep KEY=VALUES`: the what-fits table (the sweep itself is vdeploy/sweep.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vdeploy.commands.output import emit
from vdeploy.diagnostics import format_diagnostics, has_errors
from vdeploy.recipe import load_recipes
from vdeploy.sweep import SweepError, SweepRow, setting_path, sweep, sweep_values

GiB = 1 << 30


def run_sweep(args: argparse.Namespace) -> int:
    key_text, sep, spec = args.sweep.partition("=")
    try:
        if not sep:
            raise SweepError(f"--sweep {args.sweep!r}: give KEY=VALUES, e.g. memory.max_model_len=2048..32768")
        key = setting_path(key_text.strip())
        values = sweep_values(spec.strip(), key)
    except SweepError as e:
        print(f"vdeploy plan: {e}", file=sys.stderr)
        return 1
    documents = [d for d in load_recipes(args.file)
                 if args.name is None or (d.recipe is not None and d.recipe.deployment_name == args.name)]
    broken = [d for doc in documents for d in doc.diagnostics if doc.recipe is None]
    if not documents or has_errors(broken):
        print(format_diagnostics(broken, "text") if broken else f"vdeploy plan: no recipe named {args.name!r} in "
              f"{args.file}", file=sys.stderr)
        return 1
    tables = [(d.recipe, sweep(d.recipe, key, values, args.file)) for d in documents]
    setting = ".".join(key)
    if args.output in ("json", "yaml"):
        objects = [{"name": recipe.deployment_name, "setting": setting, "rows": [r.to_json() for r in rows]}
                   for recipe, rows in tables]
        emit(objects[0] if len(objects) == 1 else objects, args.output)
    else:
        print("\n\n".join(sweep_text(recipe.deployment_name, setting, rows) for recipe, rows in tables))
    return 0


def sweep_text(name: str, setting: str, rows: list[SweepRow]) -> str:
    """The table: one line per value; then the first value that does not fit, and why."""
    columns = [("MAX_MODEL_LEN", "max_model_len", "{}"), ("MAX_NUM_SEQS", "max_num_seqs", "{}"),
               ("TP", "tensor_parallel_size", "{}"), ("KV TOKENS", "kv_tokens", "{:,}")]
    columns = [c for c in columns if c[1] != setting.rsplit(".", 1)[-1]]  # the swept setting is the first column
    table = [[setting.rsplit(".", 1)[-1].upper(), "FITS", *(c[0] for c in columns), "KV CACHE", "CONCURRENCY", "WHY NOT"]]
    table += [[_show(r.value), "yes" if r.fits else "no", *(_show(getattr(r, attr), form) for _, attr, form in columns),
               _show(r.kv_cache_bytes and max(r.kv_cache_bytes, 0) / GiB, "{:.2f} GiB"),
               _show(r.max_concurrency, "{:.2f}x"), r.error.code if r.error else ""] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [f"{name}: what fits as {setting} varies"]
    lines += ["  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths,
                                                                                               strict=True))).rstrip()
              for line in table]
    failures = {}  # the first value to fail for each reason (error code), in the table's order
    for r in rows:
        if r.error is not None:
            failures.setdefault(r.error.code, r)
    if not failures:
        lines.append(f"all {len(rows)} values fit")
    for n, r in enumerate(failures.values()):
        lines.append(f"{'first that does not fit' if n == 0 else 'also fails'}: {setting}={_show(r.value)}: "
                     f"{r.error.code} {r.error.message}")
        if r.error.hint:
            lines.append(f"  hint: {r.error.hint}")
    return "\n".join(lines)


def _show(value: Any, pattern: str = "{}") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    return pattern.format(value)
