"""The plan's EngineConfig as `vllm serve` flags. Only flags vLLM's `serve` accepts (names from vLLM's engine-argument
docs); settings equal to vLLM's defaults are left out so the command reads like one a person would write."""

from __future__ import annotations

import importlib.util
import shutil
from typing import Any

from vdeploy.settings import SETTINGS

# Settings `vllm serve` takes as a value flag (vdeploy/settings.py); a value equal to vLLM's default is not rendered.
_VALUE_SETTINGS = [s for s in SETTINGS if s.vllm and s.engine and s.kind not in ("bool", "switch")
                   and s.name not in ("host", "port", "runner", "convert")]
_FLAG_SETTINGS = [s for s in SETTINGS if s.vllm and s.kind in ("bool", "switch")]


def executable() -> str | None:
    """The `vllm` command, or None when vLLM is not installed."""
    found = shutil.which("vllm")
    if found is None and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return found


def argv(engine: dict[str, Any], host: str | None = None, port: int | None = None) -> list[str]:
    """`vllm serve MODEL ...` for an EngineConfig given as a dict (`Plan.engine` serialised)."""
    args = ["vllm", "serve", engine["model"]]
    for setting in _VALUE_SETTINGS:
        value = engine.get(setting.name)
        if value is None or value == setting.vllm_default:
            continue
        args += [setting.flag, _format(value)]
    if engine.get("runner", "generate") != "generate":
        args += ["--runner", engine["runner"]]
    if engine.get("convert", "none") not in ("none", "auto"):
        args += ["--convert", engine["convert"]]
    for setting in _FLAG_SETTINGS:
        value = engine.get(setting.name)
        if setting.kind == "bool" and value:
            args.append(setting.flag)
        elif setting.kind == "switch" and value is not None and value != setting.vllm_default:
            args.append(setting.flag if value else f"--no-{setting.flag[2:]}")
    args += ["--host", host or engine.get("host", "127.0.0.1"), "--port", str(port or engine.get("port", 8000))]
    return args


def _format(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
