"""The tokenizer and chat template: the model's own (an HF directory's files, or the one a GGUF file carries), or
`config.tokenizer`; `config.chat_template` (a file path or an inline Jinja template) overrides the model's template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.loader.errors import ModelLoadError
from engine.loader.hub import is_gguf, resolve_model

_TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".txt", ".tmpl")


def load_tokenizer(config: EngineConfig) -> Any:
    from transformers import AutoTokenizer

    source = config.tokenizer or config.model
    path = resolve_model(source, config.revision, config.download_dir)
    try:
        if is_gguf(path):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: cannot load a tokenizer: {exc}") from None
    if config.chat_template:
        tokenizer.chat_template = read_chat_template(config.chat_template)
    return tokenizer


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
