"""The tokenizer and chat template: the model's own (an HF directory's files, or the one a GGUF file carries), or
`config.tokenizer`; `config.chat_template` (a file path or an inline Jinja template) overrides the model's template.

Converting a GGUF vocabulary into a fast tokenizer takes transformers seconds to tens of seconds; the result is kept
under `$VDEPLOY_CACHE_DIR` (else `$XDG_CACHE_HOME/vdeploy`, else `~/.cache/vdeploy`), keyed by the file's identity and
the transformers version, so each later start of a replica loads it in under a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.loader.errors import ModelLoadError
from vdeploy_engine.loader.hub import is_gguf, resolve_model

_TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".txt", ".tmpl")


def load_tokenizer(config: EngineConfig) -> Any:
    from transformers import AutoTokenizer

    source = config.tokenizer or config.model
    path = resolve_model(source, config.revision, config.download_dir)
    try:
        if is_gguf(path):
            tokenizer = _gguf_tokenizer(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: cannot load a tokenizer: {exc}") from None
    if config.chat_template:
        tokenizer.chat_template = read_chat_template(config.chat_template)
    return tokenizer


def _cache_dir() -> Path:
    if override := os.environ.get("VDEPLOY_CACHE_DIR"):
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vdeploy"


def _gguf_tokenizer(path: Path) -> Any:
    import transformers

    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    cached = _cache_dir() / "gguf-tokenizers" / hashlib.sha256(identity.encode()).hexdigest()[:20]
    if cached.is_dir():
        try:
            return transformers.AutoTokenizer.from_pretrained(cached)
        except Exception:  # a damaged entry is rebuilt below
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _store(tokenizer, cached)
    return tokenizer


def _store(tokenizer: Any, entry: Path) -> None:
    """Writes the entry aside and renames it into place, so a concurrent start never reads half of one. Failing to
    store (a read-only cache, another replica winning the race) costs only the next start's time."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".staging-"))
    except OSError:
        return
    try:
        tokenizer.save_pretrained(staging)
        staging.rename(entry)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def read_chat_template(value: str) -> str:
    """A path to a template file, or the template itself."""
    path = Path(value).expanduser()
    if "{" not in value and (path.suffix in _TEMPLATE_SUFFIXES or "/" in value):
        if not path.is_file():
            raise ModelLoadError(f"chat_template: file {value!r} does not exist")
        return path.read_text(encoding="utf-8")
    if "{" not in value:
        raise ModelLoadError(f"chat_template: {value!r} is neither a template file nor a Jinja template")
    return value
