"""The pre-switch GGUF header check (llamavm/host/gguf.py) on a vocab-sized header: string
arrays far longer than one read, cut anywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from llamavm.host import gguf


@pytest.fixture(scope="module")
def big_header(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "vocab.gguf"
    writer = GGUFWriter(str(path), "llama")
    # 300k strings of varied length: ~9 MB of header, over two 4 MiB reads
    writer.add_token_list([f"token-{i}-" + "x" * (i % 23) for i in range(300_000)])
    writer.add_token_merges([f"a{i} b{i}" for i in range(1000)])
    writer.add_tensor("t.weight", np.ones((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_vocab_sized_header_passes(big_header) -> None:
    gguf.check_header(big_header, big_header.stat().st_size)


@pytest.mark.parametrize("keep", [100, 4 << 20, (4 << 20) + 5, 7_000_000])
def test_a_header_cut_inside_its_strings_is_refused(tmp_path, big_header, keep) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(big_header.read_bytes()[:keep])
    with pytest.raises(ValueError, match=r"ends inside the header|cut short"):
        gguf.check_header(cut, cut.stat().st_size)


def test_the_hosts_check_and_the_controllers_read_walk_the_same_header(tmp_path) -> None:
    path = tmp_path / "aligned.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("general.alignment", 64)
    writer.add_token_list([f"t{i}" for i in range(1000)])
    writer.add_tensor("a.weight", np.ones((8, 32), dtype=np.float32))
    writer.add_tensor("b.weight", np.ones((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    read = gguf.read(path)  # every value, from a memory map
    with path.open("rb") as handle:
        streamed = gguf.walk(gguf._Stream(handle))  # the host's check: values skipped
    assert (streamed.version, streamed.n_tensors) == (read.version, read.n_tensors) == (3, 2)
    assert streamed.data_start == read.data_start and read.data_start % 64 == 0
    assert streamed.last_offset == read.last_offset > 0
    assert streamed.metadata == {} and streamed.tensors == ()  # nothing of it kept
    assert read.metadata["general.alignment"] == 64
    assert [(name, shape) for name, shape, _ in read.tensors] == [
        ("a.weight", (32, 8)),
        ("b.weight", (4, 4)),
    ]
    # The data ends where the file does: one byte less and the check refuses it.
    gguf.check_header(path, path.stat().st_size)
    with pytest.raises(ValueError, match="truncated"):
        gguf.check_header(path, read.data_start + read.last_offset)
