"""llamavm.inputs.gguf_meta against gguf's own reader: the same metadata and tensor table, on
GGUFs the tests write and on the vocabularies of the cached llama.cpp source; broken files
refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from llamavm.artifacts import tinymodel
from llamavm.errors import LlamavmError
from llamavm.inputs import gguf_meta


def _theirs(path: Path) -> tuple[dict, list]:
    reader = GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the reader's own bookkeeping (version, counts)
        value = field.contents()
        meta[key] = list(value) if isinstance(value, list) else value
    tensors = [(t.name, int(t.n_bytes), int(t.tensor_type)) for t in reader.tensors]
    return meta, tensors


def _mine(path: Path) -> tuple[dict, list]:
    header = gguf_meta.read(path)
    return header.metadata, [(t.name, t.n_bytes, t.ggml_type) for t in header.tensors]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv([2, 4])
    writer.add_float32("llama.rope.freq_base", 10000.5)
    writer.add_bool("llamavm.flag", True)
    writer.add_string("tokenizer.chat_template", "{{ 'héllo' }} ✓")
    writer.add_token_list([f"tok-{i}" + "é" * (i % 3) for i in range(5000)])
    writer.add_token_scores([float(i) / 7 for i in range(5000)])
    writer.add_token_types([1 + i % 3 for i in range(5000)])
    writer.add_array("llamavm.nested", [[1, 2], [3]])
    writer.add_tensor("a.weight", np.ones((8, 32), dtype=np.float32))
    writer.add_tensor("b.weight", np.ones((4, 64), dtype=np.float16))
    q8 = np.zeros((2, 34 * 2), dtype=np.uint8)  # two rows of 64 Q8_0 weights: 2 blocks each
    writer.add_tensor("c.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_same_header_as_ggufs_reader(written: Path) -> None:
    mine, theirs = _mine(written), _theirs(written)
    # An array of arrays keeps its shape (gguf's contents() flattens it to [1, 2, 3]).
    assert mine[0].pop("llamavm.nested") == [[1, 2], [3]]
    theirs[0].pop("llamavm.nested")
    assert mine[0] == theirs[0]
    assert mine[1] == theirs[1]
    assert [n for n, _, _ in mine[1]] == ["a.weight", "b.weight", "c.weight"]
    assert [b for _, b, _ in mine[1]] == [8 * 32 * 4, 4 * 64 * 2, 2 * 2 * 34]


def test_the_cached_sources_vocabularies_read_the_same() -> None:
    for name in (tinymodel.VOCAB_NAME, tinymodel.BPE_VOCAB_NAME):
        try:
            vocab = tinymodel.find_vocab(name=name, fetch=False)
        except LlamavmError as exc:  # the llama.cpp source is not cached on this machine
            pytest.skip(str(exc))
        assert _mine(vocab) == _theirs(vocab)


@pytest.mark.parametrize("cut", [0, 3, 10, 30, 200, 5000])
def test_a_cut_or_foreign_file_is_a_value_error(written: Path, tmp_path: Path, cut: int) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(written.read_bytes()[:cut] if cut else b"not a gguf at all")
    with pytest.raises((ValueError, OSError)):
        gguf_meta.read(broken)
