"""GGUF headers: one walk of the header and tensor table, never the weights.

The walk (`walk`) knows the layout; a cursor gets the bytes. Two cursors, for two needs:
- on the host, before a switch (`check_header`): a stream of plain reads that skips what it
  need not know (strings by seeking, a vocabulary in 4 MiB reads: ~40 ms for 152k tokens) and
  checks that the tensor data fits the file. A model share may be NFS: no memory map there.
- on the controller (`read`, for llamavm.inputs.gguf_meta): a memory map that decodes every
  value, scalar arrays in one unpack, strings in one pass.
Each cursor keeps its own limits and messages (the host refuses a switch with them, the
controller names them in "not a valid GGUF").
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MAGIC = b"GGUF"
VERSIONS = (2, 3)
#: GGUF metadata value types -> struct format (GGUFValueType).
SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
          12: "d"}  # fmt: skip
STRING, ARRAY = 8, 9
#: At most this many tensors, and metadata keys; items in an array; dimensions of a tensor;
#: levels of arrays in arrays.
MAX_ENTRIES = 1 << 20
MAX_ITEMS = 1 << 28
MAX_RANK = 8
MAX_DEPTH = 4
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class Layout:
    """What the walk found (a cursor that does not keep values leaves metadata and tensors
    empty: the host's check holds nothing of a header in memory)."""

    version: int
    n_tensors: int
    metadata: dict[str, Any]
    #: (name, shape, ggml type) of each tensor, in the file's order.
    tensors: tuple[tuple[Any, tuple[int, ...], int], ...]
    #: Where the tensor data starts (aligned), and the last tensor's offset in it.
    data_start: int
    last_offset: int


class Cursor:
    """How the walk gets its bytes; raises ValueError (or struct.error, OSError) on a bad file."""

    #: Whether the walk keeps the values it is given (metadata, the tensor table).
    keep = True

    def magic(self) -> bytes:
        raise NotImplementedError

    def u32(self) -> int:
        raise NotImplementedError

    def u64(self) -> int:
        raise NotImplementedError

    def key(self) -> str:
        raise NotImplementedError

    def string(self) -> Any:
        raise NotImplementedError

    def scalar(self, kind: int) -> Any:
        raise NotImplementedError

    def check_items(self, count: int) -> None:
        raise NotImplementedError

    def scalars(self, item: int, count: int) -> Any:
        raise NotImplementedError

    def items(self, item: int, count: int, depth: int) -> Any:
        raise NotImplementedError

    def shape(self, n_dims: int) -> tuple[int, ...]:
        raise NotImplementedError

    def tell(self) -> int:
        raise NotImplementedError

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in SCALAR:
            return self.scalar(kind)
        if kind == STRING:
            return self.string()
        if kind == ARRAY and depth < MAX_DEPTH:
            item, count = self.u32(), self.u64()
            self.check_items(count)
            if item in SCALAR:
                return self.scalars(item, count)
            return self.items(item, count, depth)
        raise ValueError(f"unknown metadata type {kind}")


def walk(cursor: Cursor) -> Layout:
    """The header and tensor table, as far as `cursor` reads them."""
    if cursor.magic() != MAGIC:
        raise ValueError("no GGUF magic")
    version = cursor.u32()
    if version not in VERSIONS:
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = cursor.u64(), cursor.u64()
    if n_tensors > MAX_ENTRIES or n_kv > MAX_ENTRIES:
        raise ValueError("implausible tensor or key count")
    metadata: dict[str, Any] = {}
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = cursor.key()
        kind = cursor.u32()
        value = cursor.value(kind)
        if cursor.keep:
            metadata[key] = value
        if key == "general.alignment" and kind == 4:
            alignment = value or DEFAULT_ALIGNMENT
    tensors = []
    last_offset = 0
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.u32()
        if n_dims > MAX_RANK:
            raise ValueError("implausible tensor rank")
        shape = cursor.shape(n_dims)
        ggml_type = cursor.u32()
        last_offset = max(last_offset, cursor.u64())  # the tensor's offset in the data
        if cursor.keep:
            tensors.append((name, shape, ggml_type))
    data_start = (cursor.tell() + alignment - 1) // alignment * alignment
    return Layout(version, n_tensors, metadata, tuple(tensors), data_start, last_offset)


# --- on the host: is this a sound GGUF? -----------------------------------------------------------


class _Stream(Cursor):
    """Plain reads of an open file; strings and arrays skipped unread, nothing kept."""

    keep = False

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle

    def _read(self, n: int) -> bytes:
        chunk = self.handle.read(n)
        if len(chunk) != n:
            raise ValueError("file ends inside the header")
        return chunk

    def magic(self) -> bytes:
        return self._read(4)

    def u32(self) -> int:
        return int(struct.unpack("<I", self._read(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self._read(8))[0])

    def key(self) -> str:
        length = self.u64()
        if length > 1 << 16:
            raise ValueError("implausible key length")
        return self._read(length).decode(errors="replace")

    def string(self) -> None:
        length = self.u64()
        if length > 1 << 24:
            raise ValueError("implausible string length")
        self.handle.seek(length, os.SEEK_CUR)

    def scalar(self, kind: int) -> Any:
        form = "<" + SCALAR[kind]
        return struct.unpack(form, self._read(struct.calcsize(form)))[0]

    def check_items(self, count: int) -> None:
        if count > MAX_ITEMS:
            raise ValueError("implausible array length")

    def scalars(self, item: int, count: int) -> None:
        self.handle.seek(struct.calcsize("<" + SCALAR[item]) * count, os.SEEK_CUR)

    def items(self, item: int, count: int, depth: int) -> None:
        if item == STRING:
            self._skip_strings(count)
            return
        for _ in range(count):
            self.value(item, depth + 1)

    def _skip_strings(self, count: int) -> None:
        """Skip `count` length-prefixed strings (a vocab: 150k+ of them) in 4 MiB reads."""
        handle = self.handle
        base, pos, buf = handle.tell(), 0, b""
        length_at = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > len(buf):
                base += pos
                handle.seek(base)
                buf, pos = handle.read(1 << 22), 0
                if len(buf) < 8:
                    raise ValueError("file ends inside the header")
            (length,) = length_at(buf, pos)
            if length > 1 << 24:
                raise ValueError("implausible string length")
            pos += 8 + length
        handle.seek(base + pos)

    def shape(self, n_dims: int) -> tuple[int, ...]:
        return struct.unpack(f"<{n_dims}Q", self._read(8 * n_dims))

    def tell(self) -> int:
        return self.handle.tell()


def check_header(path: Path, size: int) -> None:
    """Raise ValueError (or struct.error/OSError) unless the header and tensor table fit."""
    with path.open("rb") as handle:
        layout = walk(_Stream(handle))
    if layout.n_tensors and layout.data_start + layout.last_offset >= size:
        raise ValueError("tensor data is cut short (truncated file)")


# --- on the controller: every value -----------------------------------------------------------


class _Mapped(Cursor):
    """A memory map, every value decoded."""

    def __init__(self, data: Any) -> None:
        self.data, self.pos = data, 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def magic(self) -> bytes:
        self.pos = 4
        return bytes(self.data[:4])

    def u32(self) -> int:
        return int(self.unpack("I")[0])

    def u64(self) -> int:
        return int(self.unpack("Q")[0])

    def key(self) -> str:
        return self.string()

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

    def scalar(self, kind: int) -> Any:
        return self.unpack(SCALAR[kind])[0]

    def check_items(self, count: int) -> None:
        if count > MAX_ITEMS:
            raise ValueError(f"an array of {count} items")

    def scalars(self, item: int, count: int) -> list[Any]:
        return list(self.unpack(f"{count}{SCALAR[item]}"))

    def items(self, item: int, count: int, depth: int) -> list[Any]:
        return [self.value(item, depth + 1) for _ in range(count)]

    def shape(self, n_dims: int) -> tuple[int, ...]:
        return tuple(int(d) for d in self.unpack(f"{n_dims}Q"))

    def tell(self) -> int:
        return self.pos


def read(path: str | Path) -> Layout:
    """The header of the GGUF at `path`, every value decoded; ValueError (or OSError) when it
    is not one."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        cursor = _Mapped(memoryview(m))
        try:
            return walk(cursor)
        except struct.error as exc:
            raise ValueError(f"the header is cut short ({exc})") from None
        finally:
            cursor.data.release()
