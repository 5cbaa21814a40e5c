"""Capacity what-ifs: compile one recipe once per value of one setting and tabulate what fits.

`vdeploy plan FILE --sweep memory.max_model_len=2048..32768` answers "what fits?" before anything is launched: for
each value, the KV cache it leaves, how many full-length sequences that holds, and for the first value that does not
fit, the compiler's reason. Each row is a full compile, so every check `vdeploy lint` makes applies.

Values: `A..B` doubles integers from A up to B (B always included) and steps fractions by 0.05; `A..B:STEP` adds STEP;
`A,B,C` lists them (any recipe value: numbers, `true`, profile names). `hardware=all` tries every shipped profile.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from vdeploy.diagnostics import Diagnostic
from vdeploy.recipe import Recipe, validate_recipe

FRACTION_STEP = 0.05


class SweepError(ValueError):
    """A --sweep argument that names no setting or holds no values; the message says which and why."""


@dataclass
class SweepRow:
    value: Any
    fits: bool
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    tensor_parallel_size: int | None = None
    kv_tokens: int | None = None
    kv_cache_bytes: int | None = None
    max_concurrency: float | None = None
    error: Diagnostic | None = None  # the first error that stops this value (None when it fits)

    def to_json(self) -> dict[str, Any]:
        error = self.error.model_dump(include={"code", "message", "hint", "field"}) if self.error else None
        return {**{k: v for k, v in self.__dict__.items() if k != "error"}, "error": error}


def setting_path(key: str) -> tuple[str, ...]:
    """The recipe path of `key`: a dotted path (`memory.max_model_len`) or a bare field name (`max_model_len`)."""
    sections = {name: info.annotation for name, info in Recipe.model_fields.items()}
    paths = {(name,) for name in sections}
    for name, annotation in sections.items():
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths |= {(name, leaf) for leaf in annotation.model_fields}
    wanted = tuple(key.split("."))
    found = [p for p in paths if p == wanted or (len(wanted) == 1 and p[-1] == key)]
    if len(found) != 1:
        dotted = sorted(".".join(p) for p in paths)
        close = difflib.get_close_matches(key, dotted, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SweepError(f"--sweep: no recipe setting named {key!r}{hint}")
    return max(found, key=len)


def sweep_values(spec: str, key: tuple[str, ...]) -> list[Any]:
    """The values a `--sweep KEY=SPEC` argument names (see the module's docstring)."""
    if key == ("hardware",) and spec == "all":
        from vdeploy.profiles import list_profiles

        return [p.name for p in list_profiles()]
    if ".." not in spec:
        values = [yaml.safe_load(item.strip()) for item in spec.split(",") if item.strip()]
        if not values:
            raise SweepError(f"--sweep {'.'.join(key)}: no values in {spec!r}")
        return values
    bounds, _, step_text = spec.partition(":")
    low_text, _, high_text = bounds.partition("..")
    try:
        low, high = yaml.safe_load(low_text), yaml.safe_load(high_text)
        step = yaml.safe_load(step_text) if step_text else None
        numbers = [low, high] + ([step] if step is not None else [])
        if not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers):
            raise ValueError
    except (yaml.YAMLError, ValueError):
        raise SweepError(f"--sweep {'.'.join(key)}: {spec!r} is not a range of numbers (use A..B, A..B:STEP or "
                         "A,B,C)") from None
    if low > high or low <= 0 or (step is not None and step <= 0):
        raise SweepError(f"--sweep {'.'.join(key)}: {spec!r} needs 0 < A <= B and a positive STEP")
    whole = all(isinstance(n, int) for n in numbers)
    values: list[Any] = []
    value = low
    while value <= high + 1e-9:
        values.append(value if whole else round(value, 4))
        if step is not None:
            value += step
        elif whole:
            value *= 2
        else:
            value += FRACTION_STEP
    if values[-1] < high and not math.isclose(values[-1], high):
        values.append(high)
    return values


def sweep(recipe: Recipe, key: tuple[str, ...], values: list[Any], file: str) -> list[SweepRow]:
    """One compile of `recipe` for each value of the setting at `key`."""
    from vdeploy.compiler import plan_recipe

    rows = []
    for value in values:
        data = recipe.model_dump(exclude_unset=True)
        _assign(data, key, value)
        document = validate_recipe(data, file=file)
        if document.recipe is None:
            rows.append(SweepRow(value, False, error=_first_error(document.diagnostics)))
            continue
        plan, diagnostics = plan_recipe(document.recipe)
        error = _first_error(diagnostics)
        row = SweepRow(value, error is None, error=error)
        if plan is not None:
            engine, m = plan.engine, plan.memory
            row.max_model_len, row.tensor_parallel_size = engine.max_model_len, engine.tensor_parallel_size
            if m is not None:  # what the budget leaves for the KV cache, fitting or not
                row.kv_tokens, row.kv_cache_bytes = m.kv_tokens, m.kv_cache_bytes
            if error is None:  # the batch a failed compile settled on means nothing
                row.max_num_seqs, row.max_concurrency = engine.max_num_seqs, m.max_concurrency if m else None
        rows.append(row)
    return rows


def _assign(data: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
    if key == ("hardware",) and isinstance(data.get("hardware"), dict):
        data["hardware"] = {**data["hardware"], "profile": value}  # keep the recipe's GPU count
        return
    target = data
    for part in key[:-1]:
        target = target.setdefault(part, {})
    target[key[-1]] = value


def _first_error(diagnostics: list[Diagnostic]) -> Diagnostic | None:
    return next((d for d in diagnostics if d.severity == "error"), None)
