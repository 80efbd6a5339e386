"""GGUF files for the tests: ones with known tensor shapes, written with gguf's own writer (a
dense llama, and its MoE and tied-embedding variants, whose byte counts the tests compute by
plain arithmetic), and the vocabulary the tiny stand-ins (llamavm.artifacts.tinymodel) are
written with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from llamavm.artifacts import tinymodel

MIB = 1024 * 1024
F16 = 2
F32 = 4

# A dense llama: 4 layers, 256-dim, 8 heads, 2 KV heads (GQA), head dim 32, vocab 1000.
N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_VOCAB = 4, 256, 8, 2, 512, 1000
HEAD_DIM = N_EMBD // N_HEAD
LAYER_BYTES = (
    N_EMBD * N_EMBD * F16 * 2  # attn_q, attn_output
    + HEAD_DIM * N_HEAD_KV * N_EMBD * F16 * 2  # attn_k, attn_v
    + N_FF * N_EMBD * F16 * 3  # ffn_gate, ffn_up, ffn_down
    + N_EMBD * F32 * 2  # attn_norm, ffn_norm
)
EMBD_BYTES = N_VOCAB * N_EMBD * F16
OUTPUT_BYTES = N_VOCAB * N_EMBD * F16 + N_EMBD * F32  # output + output_norm

# MoE: 8 experts of 512 x 256 in F16 per gate/up/down tensor = 2 MiB each, 6 MiB a layer.
N_EXPERT = 8
EXPERT_LAYER_BYTES = 3 * N_EXPERT * N_FF * N_EMBD * F16


def gguf_writer(path: Path, arch: str = "llama", n_expert: int = 0) -> GGUFWriter:
    w = GGUFWriter(str(path), arch)
    w.add_block_count(N_LAYER)
    w.add_embedding_length(N_EMBD)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_feed_forward_length(N_FF)
    w.add_context_length(4096)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(2)
    return w


def add_tensor(w: GGUFWriter, name: str, *shape: int, dtype=np.float16) -> None:
    w.add_tensor(name, np.zeros(shape, dtype=dtype))


def finish(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_model(path: Path, *, moe: bool = False, tied: bool = False, layers=None) -> Path:
    w = gguf_writer(path, n_expert=N_EXPERT if moe else 0)
    add_tensor(w, "token_embd.weight", N_VOCAB, N_EMBD)
    add_tensor(w, "output_norm.weight", N_EMBD, dtype=np.float32)
    if not tied:
        add_tensor(w, "output.weight", N_VOCAB, N_EMBD)
    for i in layers if layers is not None else range(N_LAYER):
        add_tensor(w, f"blk.{i}.attn_norm.weight", N_EMBD, dtype=np.float32)
        add_tensor(w, f"blk.{i}.attn_q.weight", N_EMBD, N_EMBD)
        add_tensor(w, f"blk.{i}.attn_k.weight", HEAD_DIM * N_HEAD_KV, N_EMBD)
        add_tensor(w, f"blk.{i}.attn_v.weight", HEAD_DIM * N_HEAD_KV, N_EMBD)
        add_tensor(w, f"blk.{i}.attn_output.weight", N_EMBD, N_EMBD)
        add_tensor(w, f"blk.{i}.ffn_norm.weight", N_EMBD, dtype=np.float32)
        add_tensor(w, f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD)
        add_tensor(w, f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        add_tensor(w, f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)
        if moe:
            add_tensor(w, f"blk.{i}.ffn_gate_exps.weight", N_EXPERT, N_FF, N_EMBD)
            add_tensor(w, f"blk.{i}.ffn_up_exps.weight", N_EXPERT, N_FF, N_EMBD)
            add_tensor(w, f"blk.{i}.ffn_down_exps.weight", N_EXPERT, N_EMBD, N_FF)
    finish(w)
    return path


def tiny_vocab() -> Path:
    """The vocabulary tinymodel.write needs; the test is skipped where the llama.cpp source it
    comes from is not cached on this machine."""
    try:
        return tinymodel.find_vocab()
    except Exception as exc:  # the llama.cpp source is not cached on this machine
        pytest.skip(f"no vocab: {exc}")
