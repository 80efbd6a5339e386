"""A GGUF's metadata and tensor table, read with the standard library.

gguf's own reader turns every item of every array into numpy objects: a 152k-token vocabulary
(and its merges) takes seconds on 2 cores, for each model `invoke models` and `invoke provision`
size and for each tiny stand-in llamavm writes from a vocabulary. The host's GGUF reader
(llamavm.host.gguf, the one walk of the header the host checks before a switch) reads the same
header straight from a memory map: scalar arrays in one unpack, strings in one pass, never the
weights. This is its answer as the controller uses it: tensors that know their size in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamavm.host import gguf as host_gguf


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


def read(path: str | Path) -> Header:
    """The header of the GGUF at `path`; ValueError (or OSError) when it is not one."""
    layout = host_gguf.read(path)
    tensors = tuple(Tensor(name, shape, ggml_type) for name, shape, ggml_type in layout.tensors)
    return Header(layout.version, layout.metadata, tensors)
