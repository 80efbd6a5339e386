"""The tiny stand-ins' files (llamavm/artifacts/tinymodel.py): the architecture and tokenizer
llama.cpp will see, and the designed answer laid out in the weights. llama-server serving them
is tested on the test bed (tests/integration/test_standins.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from llamavm import REPO_ROOT
from llamavm.artifacts import tinymodel
from llamavm.errors import LlamavmError


def _spec(name: str) -> tinymodel.TinySpec:
    entries = yaml.safe_load((REPO_ROOT / "config" / "tiny-models.yaml").read_text())
    entry = dict(next(e for e in entries if e["name"] == name))
    entry.pop("file")
    return tinymodel.TinySpec(**entry)


@pytest.fixture(scope="module")
def vocab() -> Path:
    try:
        return tinymodel.find_vocab(name=tinymodel.BPE_VOCAB_NAME, fetch=False)
    except LlamavmError as exc:  # the llama.cpp source is not cached on this machine
        pytest.skip(str(exc))


def _decode(tokens: list[str], ids: list[int]) -> str:
    table = tinymodel._byte_decoder()
    out = b""
    for i in ids:
        text = tokens[i]
        if text.startswith("<|"):
            out += text.encode()
        else:
            out += bytes(table[c] for c in text)
    return out.decode()


@pytest.mark.parametrize("name", ["gpt-oss-120b", "qwen3-coder-30b"])
def test_a_stand_in_has_its_architecture_template_and_designed_answer(
    tmp_path, vocab, name
) -> None:
    from gguf import GGUFReader

    spec = _spec(name)
    path = tinymodel.write(spec, tmp_path / f"{name}.gguf", vocab)
    reader = GGUFReader(str(path))
    fields = reader.fields
    arch = fields["general.architecture"].contents()
    assert arch == spec.arch
    assert fields[f"{arch}.expert_count"].contents() == spec.n_expert
    template = fields["tokenizer.chat_template"].contents()
    assert template == tinymodel.find_in_source(spec.template, fetch=False).read_text()
    tokens = [str(t) for t in fields["tokenizer.ggml.tokens"].contents()]
    types = [int(t) for t in fields["tokenizer.ggml.token_type"].contents()]
    chain = tinymodel._chain(spec, tokens, types)
    text = _decode(tokens, chain[1:])
    if arch == "gpt-oss":
        assert text == (
            f"<|channel|>analysis<|message|>{spec.reasoning}<|end|>"
            f"<|start|>assistant<|channel|>final<|message|>{spec.answer}<|return|>"
        )
        for special in tinymodel.HARMONY_TOKENS:
            assert types[tokens.index(special)] == 3  # CONTROL
    else:
        assert text == f"{spec.answer}<|im_end|>"
    # every token of the answer is a unit vector of its own in the embedding
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight").data
    rows = np.asarray(embd[list(dict.fromkeys(chain))], dtype=np.float32)
    assert np.allclose(np.abs(rows).sum(axis=1), 1.0)
    assert np.linalg.matrix_rank(rows) == len(rows)


def test_an_answer_that_cannot_be_spelled_is_refused_with_the_fix() -> None:
    with pytest.raises(LlamavmError, match="reword it"):
        tinymodel._spell("aaa", {"a": 1}, set())


def test_the_byte_decoder_covers_every_byte() -> None:
    table = tinymodel._byte_decoder()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n")
