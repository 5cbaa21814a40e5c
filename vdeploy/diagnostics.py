"""Diagnostics: a stable code, a severity, a location in the recipe, a message and a fix, like a linter's."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

Severity = Literal["error", "warning", "info"]


class Diagnostic(BaseModel):
    code: str  # stable, e.g. "VD101"
    severity: Severity
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    hint: str | None = None
    field: str | None = None  # dotted recipe path the diagnostic is about
