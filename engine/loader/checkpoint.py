"""Reading an HF checkpoint directory tensor by tensor: safetensors (one file, or shards listed in
model.safetensors.index.json), falling back to PyTorch .bin files for old repositories."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from vdeploy_engine.loader.errors import ModelLoadError


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files of an HF model directory, in load order."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            return _files_from_index(index)
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise ModelLoadError(f"{path}: no weights found (model.safetensors, *.safetensors shards or pytorch_model.bin)")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{index}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except (KeyError, TypeError):
        raise ModelLoadError(f"{index}: no 'weight_map' object") from None
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{index}: lists shard(s) that are not there: {', '.join(missing)}")
    return files


def iter_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one file open at a time, so peak host memory stays near one shard."""
    for file in checkpoint_files(path):
        if file.suffix == ".safetensors":
            yield from _iter_safetensors(file)
        else:
            yield from _iter_torch_bin(file)


def _iter_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
    except SafetensorError as exc:
        raise ModelLoadError(f"{file}: not a readable safetensors file (truncated or corrupt?): {exc}") from None


def _iter_torch_bin(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad archive
        raise ModelLoadError(f"{file}: not a readable PyTorch checkpoint: {type(exc).__name__}: {exc}") from None
    yield from state.items()
