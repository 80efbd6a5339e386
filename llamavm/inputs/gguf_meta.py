"""A GGUF's metadata and tensor table, read with the standard library.

gguf's own reader turns every item of every array into numpy objects: a 152k-token vocabulary
(and its merges) takes seconds on 2 cores, for each model `invoke models` and `invoke provision`
size and for each tiny stand-in llamavm writes from a vocabulary. This reads the same header
straight from a memory map: scalar arrays in one unpack, strings in one pass, never the weights.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: GGUF metadata value types -> struct format (GGUFValueType).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 28


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: int

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def n_bytes(self) -> int:
        """Bytes of its data (ggml's block size and type size for its type)."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return self.n_elements * size // block


@dataclass(frozen=True)
class Header:
    version: int
    metadata: dict[str, Any]
    tensors: tuple[Tensor, ...]


class _Cursor:
    def __init__(self, data: Any) -> None:
        self.data, self.pos = data, 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def u32(self) -> int:
        return int(self.unpack("I")[0])

    def u64(self) -> int:
        return int(self.unpack("Q")[0])

    def string(self) -> str:
        length = self.u64()
        if length > 1 << 30 or self.pos + length > len(self.data):
            raise ValueError("a string runs past the end of the file")
        raw = bytes(self.data[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _SCALAR:
            return self.unpack(_SCALAR[kind])[0]
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY and depth < 4:
            item, count = self.u32(), self.u64()
            if count > _MAX_COUNT:
                raise ValueError(f"an array of {count} items")
            if item in _SCALAR:
                return list(self.unpack(f"{count}{_SCALAR[item]}"))
            return [self.value(item, depth + 1) for _ in range(count)]
        raise ValueError(f"unknown metadata type {kind}")


def read(path: str | Path) -> Header:
    """The header of the GGUF at `path`; ValueError (or OSError) when it is not one."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        cursor = _Cursor(memoryview(m))
        try:
            if bytes(cursor.data[:4]) != b"GGUF":
                raise ValueError("no GGUF magic")
            cursor.pos = 4
            version = cursor.u32()
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version}")
            n_tensors, n_kv = cursor.u64(), cursor.u64()
            if n_tensors > 1 << 20 or n_kv > 1 << 20:
                raise ValueError("implausible tensor or key count")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cursor.string()
                metadata[key] = cursor.value(cursor.u32())
            tensors = []
            for _ in range(n_tensors):
                name = cursor.string()
                n_dims = cursor.u32()
                if n_dims > 8:
                    raise ValueError("implausible tensor rank")
                shape = cursor.unpack(f"{n_dims}Q")
                ggml_type = cursor.u32()
                cursor.u64()  # offset in the data section
                tensors.append(Tensor(name, tuple(int(d) for d in shape), ggml_type))
            return Header(version, metadata, tuple(tensors))
        except struct.error as exc:
            raise ValueError(f"the header is cut short ({exc})") from None
        finally:
            cursor.data.release()
