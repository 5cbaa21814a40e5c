"""Diagnostics: a stable code, a severity, a location in the recipe, a message and a fix, like a linter's.

Codes never change meaning once published; `CODES` is the catalogue (`vdeploy lint --codes` lists it).
VD0xx: reading the recipe. VD1xx: hardware. VD2xx: the model. VD3xx: memory and batching.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from typing import Literal, TextIO

from pydantic import BaseModel

Severity = Literal["error", "warning", "info"]

CODES: dict[str, str] = {
    "VD001": "not valid YAML",
    "VD002": "a recipe document is not a mapping",
    "VD003": "unknown key",
    "VD004": "missing required field",
    "VD005": "invalid value",
    "VD006": "removed key `task` (use `runner` + `convert`)",
    "VD007": "literal secret (`api_key`) in a recipe",
    "VD008": "two recipes with the same name in one file",
    "VD009": "duplicate key in a mapping",
    "VD010": "no recipe found",
    "VD011": "file cannot be read",
    "VD012": "secret-looking literal value in `env`",
    "VD101": "unknown hardware profile",
    "VD102": "not enough GPUs for the parallelism",
    "VD103": "dtype not supported by the GPU",
    "VD104": "quantization not supported by the GPU",
    "VD105": "CUDA graphs unsafe on this GPU",
    "VD106": "hardware detected automatically",
    "VD201": "model path does not exist",
    "VD202": "model facts unavailable offline",
    "VD203": "GGUF file unreadable or truncated",
    "VD204": "malformed config.json or safetensors header",
    "VD205": "runner does not suit the model",
    "VD206": "tensor parallel size does not divide the attention heads",
    "VD207": "max_model_len exceeds the model's positions",
    "VD208": "quantization does not match the checkpoint",
    "VD209": "model needs trust_remote_code",
    "VD210": "the built-in engine cannot run this setting",
    "VD211": "vLLM has no counterpart for this setting",
    "VD301": "the weights do not fit",
    "VD302": "max_model_len does not fit in the KV cache",
    "VD303": "max_num_batched_tokens too small",
}


class Diagnostic(BaseModel):
    code: str  # stable, e.g. "VD101"; see CODES
    severity: Severity
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    hint: str | None = None
    field: str | None = None  # dotted recipe path the diagnostic is about


def error(code: str, message: str, *, field: str | None = None, hint: str | None = None) -> Diagnostic:
    return Diagnostic(code=code, severity="error", message=message, field=field, hint=hint)


def warning(code: str, message: str, *, field: str | None = None, hint: str | None = None) -> Diagnostic:
    return Diagnostic(code=code, severity="warning", message=message, field=field, hint=hint)


def info(code: str, message: str, *, field: str | None = None, hint: str | None = None) -> Diagnostic:
    return Diagnostic(code=code, severity="info", message=message, field=field, hint=hint)


def has_errors(diagnostics: Iterable[Diagnostic]) -> bool:
    return any(d.severity == "error" for d in diagnostics)


# ---------------------------------------------------------------------------------------------------------- output

FORMATS = ("text", "json", "sarif", "github")
_COLOURS = {"error": "\033[1;31m", "warning": "\033[1;33m", "info": "\033[1;36m"}
_BOLD, _RESET = "\033[1m", "\033[0m"


def _where(d: Diagnostic) -> str:
    parts = [d.file or "<recipe>"]
    if d.line is not None:
        parts.append(str(d.line))
        if d.column is not None:
            parts.append(str(d.column))
    return ":".join(parts)


def format_text(diagnostics: Iterable[Diagnostic], color: bool = False) -> str:
    """One ruff-style block per diagnostic: `file:line:col: severity[CODE] message`, then the hint."""
    lines = []
    for d in diagnostics:
        severity = f"{_COLOURS[d.severity]}{d.severity}{_RESET}" if color else d.severity
        where = f"{_BOLD}{_where(d)}{_RESET}" if color else _where(d)
        lines.append(f"{where}: {severity}[{d.code}] {d.message}")
        if d.hint:
            lines.append(f"  = hint: {d.hint}")
    return "\n".join(lines)


def _json_objects(diagnostics: Iterable[Diagnostic]) -> list[dict]:
    keys = ("code", "severity", "file", "line", "column", "message", "hint")
    return [{k: getattr(d, k) for k in keys} for d in diagnostics]


def format_sarif(diagnostics: Iterable[Diagnostic]) -> str:
    """SARIF 2.1.0, the format code-scanning services ingest."""
    levels = {"error": "error", "warning": "warning", "info": "note"}
    results = []
    for d in diagnostics:
        result: dict = {"ruleId": d.code, "level": levels[d.severity], "message": {"text": _with_hint(d)}}
        if d.file:
            region = {"startLine": d.line or 1, "startColumn": d.column or 1}
            result["locations"] = [{"physicalLocation": {"artifactLocation": {"uri": d.file}, "region": region}}]
        results.append(result)
    rules = [{"id": code, "shortDescription": {"text": text}} for code, text in CODES.items()]
    run = {"tool": {"driver": {"name": "vdeploy", "rules": rules}}}
    run["results"] = results
    sarif = {"version": "2.1.0", "$schema": "https://json.schemastore.org/sarif-2.1.0.json", "runs": [run]}
    return json.dumps(sarif, indent=2)


def format_github(diagnostics: Iterable[Diagnostic]) -> str:
    """GitHub Actions workflow commands: each diagnostic becomes an annotation on the recipe's line."""
    commands = {"error": "error", "warning": "warning", "info": "notice"}
    lines = []
    for d in diagnostics:
        props = [f"file={d.file}"] if d.file else []
        if d.line is not None:
            props.append(f"line={d.line}")
        if d.column is not None:
            props.append(f"col={d.column}")
        props.append(f"title={d.code}")
        message = _with_hint(d).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        lines.append(f"::{commands[d.severity]} {','.join(props)}::{message}")
    return "\n".join(lines)


def _with_hint(d: Diagnostic) -> str:
    return f"{d.message} (hint: {d.hint})" if d.hint else d.message


def format_diagnostics(diagnostics: Iterable[Diagnostic], fmt: str = "text", color: bool = False) -> str:
    diagnostics = list(diagnostics)
    if fmt == "text":
        return format_text(diagnostics, color)
    if fmt == "json":
        return json.dumps(_json_objects(diagnostics), indent=2)
    if fmt == "sarif":
        return format_sarif(diagnostics)
    if fmt == "github":
        return format_github(diagnostics)
    raise ValueError(f"unknown diagnostics format {fmt!r}; choose one of {', '.join(FORMATS)}")


def use_color(stream: TextIO | None = None) -> bool:
    """Colour on a terminal unless NO_COLOR is set (https://no-color.org)."""
    stream = stream or sys.stdout
    return stream.isatty() and "NO_COLOR" not in os.environ
