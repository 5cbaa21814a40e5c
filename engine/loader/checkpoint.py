"""Reading an HF checkpoint directory tensor by tensor: safetensors (one file, or shards listed in
model.safetensors.index.json), falling back to PyTorch .bin files for old repositories."""

from __future__ import annotations

import json
import mmap
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
    """Tensors that view the memory-mapped file rather than copy it: a tensor-parallel rank's loader copies out only
    its slice, so no rank holds a whole tensor in host memory (the page cache is shared by the ranks)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as handle:  # checks the header and the data offsets
            names = list(handle.keys())
    except SafetensorError as exc:
        raise ModelLoadError(f"{file}: not a readable safetensors file (truncated or corrupt?): {exc}") from None
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private pages: writable views, file untouched
    for name in names:
        entry = header[name]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        start, end = entry["data_offsets"]
        if start == end:
            yield name, torch.empty(entry["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + header_size + start)
        yield name, flat.view(entry["shape"])


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _iter_torch_bin(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad archive
        raise ModelLoadError(f"{file}: not a readable PyTorch checkpoint: {type(exc).__name__}: {exc}") from None
    yield from state.items()
