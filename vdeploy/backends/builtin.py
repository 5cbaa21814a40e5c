"""The builtin engine: `python -m vdeploy_engine.server --config PLAN.json --host H --port P`."""

from __future__ import annotations

import sys


def argv(plan_path: str, host: str, port: int, python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "vdeploy_engine.server", "--config", plan_path, "--host", host, "--port", str(port)]
