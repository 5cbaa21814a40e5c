"""The model's transformers config: config.json of an HF directory, or one built from a GGUF file's metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.loader.errors import ModelLoadError
from vdeploy_engine.loader.hub import is_gguf, resolve_model


def load_hf_config(config: EngineConfig) -> Any:
    """A transformers PretrainedConfig for `config.model`; `architectures[0]` picks the engine's module."""
    path = resolve_model(config.model, config.revision, config.download_dir)
    if is_gguf(path):
        from vdeploy_engine.loader.gguf import gguf_hf_config

        return gguf_hf_config(path)
    if path.is_file():
        raise ModelLoadError(f"{path}: expected a model directory or a .gguf file")
    return hf_config_from_dir(path, config.trust_remote_code)


def hf_config_from_dir(path: Path, trust_remote_code: bool = False) -> Any:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model directory)")
    # Parse it ourselves first: a broken file gets its line and column instead of a transformers traceback.
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{config_file}: not UTF-8 text ({exc.reason})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelLoadError(f"{config_file}: no 'model_type' field")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{config_file}: {exc}") from None
