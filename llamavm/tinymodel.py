"""Tiny but real llama-architecture GGUF models for the test bed and the tests.

They load in llama-server in well under a second and answer every endpoint (with random text).
The output is deterministic for a given spec, so a catalog can pin its size and sha256.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from llamavm.errors import LlamavmError

VOCAB_NAME = "ggml-vocab-llama-spm.gguf"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """The shape of a tiny model; `seed` makes different models with different weights."""

    name: str
    seed: int = 0
    #: GGUF architecture; anything but "llama" makes a file with a sound header that
    #: llama-server refuses to load (a model that crash-loops, for fault tests).
    arch: str = "llama"
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 128
    n_ctx_train: int = 4096
    #: Type of the weight matrices: f32, or f16 for big benchmark models at half the size.
    dtype: str = "f32"

    @property
    def dtype_np(self) -> str:
        return {"f32": "float32", "f16": "float16"}[self.dtype]


def find_vocab(cache: Path | None = None, fetch: bool = True) -> Path:
    """The SPM vocab GGUF inside the cached llama.cpp source; fetches the source if needed."""
    root = cache or Path(os.environ.get("LLAMAVM_CACHE", "/var/cache/llamavm"))
    for pattern in (f"src/*/vendor/llama.cpp/models/{VOCAB_NAME}", f"src/**/models/{VOCAB_NAME}"):
        for candidate in sorted(root.glob(pattern)):
            return candidate
    if fetch:
        from llamavm import source

        cfg = source.load_config()
        tree = source.extract_sdist(cfg, source.fetch_sdist(cfg, root), root)
        candidate = tree / "models" / VOCAB_NAME
        if candidate.is_file():
            return candidate
    raise LlamavmError(
        f"no {VOCAB_NAME} under {root}/src — run 'python -m llamavm.source prepare' "
        "to fetch the llama.cpp source first"
    )


def write(spec: TinySpec, path: Path, vocab: Path | None = None) -> Path:
    """Write `spec` as a GGUF at `path` (atomically) and return the path."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter, TokenType

    vocab_reader = GGUFReader(vocab or find_vocab())

    def vocab_field(key: str) -> list:
        return list(vocab_reader.fields[key].contents())

    tokens = vocab_field("tokenizer.ggml.tokens")
    scores = [float(s) for s in vocab_field("tokenizer.ggml.scores")]
    types = [int(t) for t in vocab_field("tokenizer.ggml.token_type")]
    n_vocab = len(tokens)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = GGUFWriter(str(tmp), spec.arch)
    writer.add_name(spec.name)
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(spec.n_embd // spec.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    assert TokenType.NORMAL  # the vocab's token types are reused as they are

    rng = np.random.default_rng(spec.seed)

    def tensor(name: str, *shape: int) -> None:
        if spec.dtype == "f32":  # the tiny models' weights, bit for bit as they always were
            data = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        else:
            data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(spec.dtype_np)
        writer.add_tensor(name, data)

    head_dim = spec.n_embd // spec.n_head
    tensor("token_embd.weight", n_vocab, spec.n_embd)
    writer.add_tensor("output_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
    tensor("output.weight", n_vocab, spec.n_embd)
    for i in range(spec.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", spec.n_embd, spec.n_embd)
        tensor(f"blk.{i}.attn_k.weight", spec.n_head_kv * head_dim, spec.n_embd)
        tensor(f"blk.{i}.attn_v.weight", spec.n_head_kv * head_dim, spec.n_embd)
        tensor(f"blk.{i}.attn_output.weight", spec.n_embd, spec.n_embd)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", spec.n_ff, spec.n_embd)
        tensor(f"blk.{i}.ffn_up.weight", spec.n_ff, spec.n_embd)
        tensor(f"blk.{i}.ffn_down.weight", spec.n_embd, spec.n_ff)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_all(share_root: Path, specs_file: Path | None = None) -> list[Path]:
    """Write every tiny model listed in config/tiny-models.yaml under `share_root` if missing."""
    import yaml

    from llamavm import REPO_ROOT

    specs_file = specs_file or REPO_ROOT / "config" / "tiny-models.yaml"
    entries = yaml.safe_load(specs_file.read_text(encoding="utf-8")) or []
    written = []
    vocab: Path | None = None
    for entry in entries:
        entry = dict(entry)
        target = share_root / entry.pop("file")
        if not target.exists():
            vocab = vocab or find_vocab()
            write(TinySpec(**entry), target, vocab)
        written.append(target)
    return written


#: The canary model of the llama_cpp role: a build must serve a token from it before it goes live.
CANARY = TinySpec("llamavm-canary", seed=7)


def canary(cache: Path | None = None) -> Path:
    """The canary GGUF (written once into the controller cache)."""
    root = cache or Path(os.environ.get("LLAMAVM_CACHE", "/var/cache/llamavm"))
    path = root / "canary" / f"{CANARY.name}.gguf"
    if not path.is_file():
        write(CANARY, path)
    return path
