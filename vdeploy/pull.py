"""Prefetching a model's weights before a replica needs them (`vdeploy pull`, and the first step of `apply`).

The download itself runs in the engine's downloader, `python -m vdeploy_engine.loader.pull`, in a child process: it
is the code a replica would run (huggingface_hub with HF_ENDPOINT / HF_HOME / HF_TOKEN, resumable; the ModelScope
library for `modelscope:` ids), so what it fetches lands exactly where the replica looks, and the control plane needs
no hub library (`vdeploy lint` stays light on a CI box). Its `vdeploy-phase` lines are the progress.

What arrived is then read like any local model (config.json, safetensors headers) and compared with the facts the
plan was made from (the catalogue's, when the model was not on this machine yet).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vdeploy.modelinfo import PYPI_PREFIX, ModelError, ModelFacts, facts_from_path

PHASE_MARK = "vdeploy-phase "  # vdeploy_engine.progress.MARK
# Facts that must agree between the plan and the files: a difference means another model than the one planned.
CHECKED_FACTS = ("architecture", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size",
                 "vocab_size")


class PullError(Exception):
    """The model could not be fetched or is not the one planned; the message says why and what to set."""


def needs_pull(model: str) -> bool:
    """A hub id (`org/name`) or `modelscope:` id; local files and `pypi:` packages are already here."""
    if model.startswith(PYPI_PREFIX) or Path(model).expanduser().exists():
        return False
    return model.startswith("modelscope:") or (model.count("/") == 1 and not model.startswith((".", "/", "~")))


def pull(model: str, revision: str | None = None, download_dir: str | None = None,
         on_event: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Fetch `model` into the engine's cache; returns the local folder. `on_event` sees each `pulling` event."""
    argv = [sys.executable, "-m", "vdeploy_engine.loader.pull", model]
    argv += ["--revision", revision] if revision else []
    argv += ["--download-dir", download_dir] if download_dir else []
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    other: list[str] = []
    for line in process.stderr:
        if line.startswith(PHASE_MARK):
            if on_event is not None:
                on_event(json.loads(line[len(PHASE_MARK):]))
        else:
            other.append(line.rstrip("\n"))
    out = process.stdout.read()
    if process.wait() != 0:
        raise PullError(_why(model, other))
    return Path(json.loads(out.strip().splitlines()[-1])["path"])


def _why(model: str, log: list[str]) -> str:
    failure = next((line.removeprefix("PullError: ") for line in reversed(log) if line.startswith("PullError: ")), None)
    if failure is None:
        missing = next((line for line in reversed(log) if "No module named" in line), None)
        if missing:
            return (f"cannot pull {model}: the engine's downloader is not installed here ({missing.strip()}); "
                    "pip install 'vdeploy[engine]'")
        return f"cannot pull {model}: " + (log[-1] if log else "the downloader exited without saying why")
    if model.startswith("modelscope:"):
        return f"cannot pull {model}: {failure}"
    home = os.environ.get("HF_HOME") or "~/.cache/huggingface"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return (f"cannot pull {model}: {failure}. The hub used is {endpoint}: set HF_ENDPOINT to one this machine reaches "
            f"(a mirror), HF_TOKEN for a gated model, or copy the model into the HF cache ({home}, set by HF_HOME) "
            "and set HF_HUB_OFFLINE=1")


def check_pulled(model: str, path: Path, planned: ModelFacts | None) -> ModelFacts:
    """The facts of the files pulled into `path`; PullError when they are incomplete, unreadable, or not the model
    `planned` (facts from the catalogue, made before the files were here)."""
    try:
        found = facts_from_path(path)
    except ModelError as e:
        raise PullError(f"pulled {model}, but it cannot be read: {e.message}") from None
    for file in sorted(path.glob("*.safetensors")):
        expected = _safetensors_size(file)
        if expected != file.stat().st_size:
            raise PullError(f"pulled {model}, but {file.name} is {file.stat().st_size:,} bytes where its header says "
                            f"{expected:,}: run `vdeploy pull {model}` again to resume it")
    if planned is not None and planned.source == "catalogue":
        differ = [f"{name} {getattr(found, name)} (planned {getattr(planned, name)})" for name in CHECKED_FACTS
                  if getattr(found, name) != getattr(planned, name)]
        if differ:
            raise PullError(f"pulled {model}, but its files are not the model the plan was made for: "
                            + ", ".join(differ))
    return found


def _safetensors_size(file: Path) -> int:
    """The size a complete safetensors file has: its 8-byte length, the JSON header, then the last tensor's end."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
    return 8 + length + max(ends, default=0)
