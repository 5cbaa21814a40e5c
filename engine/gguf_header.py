"""Reads a GGUF file's header (metadata and tensor table) with the standard library, without loading any weights.

The `gguf` package reads the same data, but importing it (and numpy) costs ~0.2 s, most of `vdeploy lint`'s budget;
this reader touches only the header pages through mmap. tests/control checks it against `gguf.GGUFReader`.
Shared, torch-free, by the engine's GGUF loader and the control plane's model facts (`vdeploy/modelinfo.py`).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# ggml tensor type id -> (name, elements per block, bytes per block), as ggml defines them.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}


class GGUFError(ValueError):
    """The file is not a readable GGUF file (wrong magic, truncated header or data, unknown tensor type)."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: the fastest-varying dimension first
    type_name: str
    n_elements: int
    n_bytes: int
    offset: int  # where the tensor's data starts in the file, in bytes


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # arrays are given as their length only (the header is read, not the vocabulary)
    tensors: list[GGUFTensor]
    file_size: int


class _Cursor:
    def __init__(self, buffer: Any):
        self.buffer, self.pos = buffer, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buffer):
            raise GGUFError(f"the header is truncated at byte {self.pos}")
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if self.pos + length > len(self.buffer):
            raise GGUFError(f"the header is truncated at byte {self.pos}")
        text = bytes(self.buffer[self.pos : self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.take("<I"), self.take("<Q")
            if item_kind in _SCALARS:  # fixed-size items: skip them in one step
                self.pos += count * struct.calcsize(_SCALARS[item_kind])
            elif item_kind == _STRING:  # a vocabulary: hop from length prefix to length prefix
                self._skip_strings(count)
            else:
                for _ in range(count):
                    self.value(item_kind)
            if self.pos > len(self.buffer):
                raise GGUFError("the header is truncated inside an array")
            return count
        raise GGUFError(f"unknown metadata value type {kind} at byte {self.pos}")

    def _skip_strings(self, count: int) -> None:
        unpack, buffer, pos, end = struct.unpack_from, self.buffer, self.pos, len(self.buffer) - 8
        for _ in range(count):
            if pos > end:
                raise GGUFError("the header is truncated inside a string array")
            pos += 8 + unpack("<Q", buffer, pos)[0]
        self.pos = pos


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file; raises GGUFError if the header or the tensor data is cut short."""
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        if size < 24:
            raise GGUFError(f"the file has {size} bytes, too few for a GGUF header")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _parse(_Cursor(buffer), size)


def _parse(cursor: _Cursor, size: int) -> GGUFHeader:
    if bytes(cursor.buffer[:4]) != MAGIC:
        raise GGUFError("not a GGUF file (the first bytes are not 'GGUF')")
    cursor.pos = 4
    version, tensor_count, kv_count = cursor.take("<I"), cursor.take("<Q"), cursor.take("<Q")
    if version < 2:
        raise GGUFError(f"GGUF version {version} is too old (2 or later is needed)")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.take("<I"))
    raw = []
    for _ in range(tensor_count):
        name = cursor.string()
        shape = tuple(cursor.take("<Q") for _ in range(cursor.take("<I")))
        raw.append((name, shape, cursor.take("<I"), cursor.take("<Q")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cursor.pos // alignment) * alignment
    tensors, data_end = [], data_start
    for name, shape, type_id, offset in raw:
        if type_id not in GGML_TYPES:
            raise GGUFError(f"tensor {name} has unknown ggml type {type_id}")
        type_name, block_elements, block_bytes = GGML_TYPES[type_id]
        elements = math.prod(shape)
        n_bytes = elements // block_elements * block_bytes
        tensors.append(GGUFTensor(name, shape, type_name, elements, n_bytes, data_start + offset))
        data_end = max(data_end, data_start + offset + n_bytes)
    if data_end > size:
        raise GGUFError(f"the file is truncated: it has {size:,} bytes but its tensors need {data_end:,}")
    return GGUFHeader(version, metadata, tensors, size)
