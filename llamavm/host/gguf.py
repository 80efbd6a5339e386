"""Is this a sound GGUF? Walk its header and tensor table without reading the weights."""

from __future__ import annotations

import os
import struct
from pathlib import Path

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def check_header(path: Path, size: int) -> None:
    """Raise ValueError (or struct.error/OSError) unless the header and tensor table fit."""
    with path.open("rb") as handle:

        def read(n: int) -> bytes:
            chunk = handle.read(n)
            if len(chunk) != n:
                raise ValueError("file ends inside the header")
            return chunk

        def u64() -> int:
            return int(struct.unpack("<Q", read(8))[0])

        def skip_string() -> None:
            length = u64()
            if length > 1 << 24:
                raise ValueError("implausible string length")
            handle.seek(length, os.SEEK_CUR)

        def skip_strings(count: int) -> None:
            """Skip `count` length-prefixed strings (a vocab: 150k+ of them) in 4 MiB reads."""
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

        def skip_value(kind: int, depth: int = 0) -> None:
            if kind in _SCALAR:
                read(_SCALAR[kind])
            elif kind == 8:
                skip_string()
            elif kind == 9 and depth < 4:
                item, count = struct.unpack("<I", read(4))[0], u64()
                if count > 1 << 28:
                    raise ValueError("implausible array length")
                if item in _SCALAR:
                    handle.seek(_SCALAR[item] * count, os.SEEK_CUR)
                elif item == 8:
                    skip_strings(count)
                else:
                    for _ in range(count):
                        skip_value(item, depth + 1)
            else:
                raise ValueError(f"unknown metadata type {kind}")

        if read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        version = struct.unpack("<I", read(4))[0]
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = u64(), u64()
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise ValueError("implausible tensor or key count")
        alignment = 32
        for _ in range(n_kv):
            key_len = u64()
            if key_len > 1 << 16:
                raise ValueError("implausible key length")
            key = read(key_len).decode(errors="replace")
            kind = struct.unpack("<I", read(4))[0]
            if key == "general.alignment" and kind == 4:
                alignment = struct.unpack("<I", read(4))[0] or 32
            else:
                skip_value(kind)
        last_offset = 0
        for _ in range(n_tensors):
            skip_string()
            n_dims = struct.unpack("<I", read(4))[0]
            if n_dims > 8:
                raise ValueError("implausible tensor rank")
            read(8 * n_dims + 4)
            last_offset = max(last_offset, u64())
        data_start = (handle.tell() + alignment - 1) // alignment * alignment
        if n_tensors and data_start + last_offset >= size:
            raise ValueError("tensor data is cut short (truncated file)")
