"""Tiny but real GGUF models for the test bed and the tests, written with the gguf package.

Three real architectures llama.cpp loads on the code paths of the production models:
- `llama`: a 2-layer llama with random weights (answers with random text);
- `qwen3moe`: a tiny Qwen3 MoE (experts, router, q/k norms) with Qwen3-Coder's chat template;
- `gpt-oss`: a tiny GPT-OSS MoE (attention sinks, sliding-window layers, biased experts) with
  the harmony special tokens and GPT-OSS's chat template.
The MoE stand-ins use the Qwen2 BPE vocab from the llama.cpp source and take their chat template
from the same source. Their weights are random except for a designed path: the embedding and
output rows of a few tokens form a chain, so the model answers a chat with `answer` (after a
harmony analysis block saying `reasoning`, for GPT-OSS) whatever the prompt; every other
token gets the random weights. They load in well under a second.
The output is deterministic for a given spec, so a catalog can pin its size and sha256.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamavm import paths
from llamavm.errors import LlamavmError
from llamavm.inputs import gguf_meta

VOCAB_NAME = "ggml-vocab-llama-spm.gguf"
#: The vocab of the MoE stand-ins (Qwen's byte-level BPE; GPT-OSS gets the harmony tokens added).
BPE_VOCAB_NAME = "ggml-vocab-qwen2.gguf"
MOE_ARCHS = ("qwen3moe", "gpt-oss")
#: The harmony special tokens a GPT-OSS vocab carries (written over the vocab's padding slots).
HARMONY_TOKENS = (
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>",
)  # fmt: skip

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
    #: MoE stand-ins only: experts, experts per token, expert FFN width, attention head size.
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    head_dim: int = 0
    #: MoE stand-ins only: the chat template's path inside the llama.cpp source.
    template: str = ""
    #: MoE stand-ins only: what the model answers a chat with (GPT-OSS: in its final channel,
    #: after an analysis block saying `reasoning`).
    answer: str = ""
    reasoning: str = ""

    @property
    def dtype_np(self) -> str:
        return {"f32": "float32", "f16": "float16"}[self.dtype]


def find_in_source(relpath: str, cache: Path | None = None, fetch: bool = True) -> Path:
    """A file of the cached llama.cpp source (e.g. models/X.gguf); fetches the source if needed."""
    root = cache or paths.cache()
    for pattern in (f"src/*/vendor/llama.cpp/{relpath}", f"src/**/{relpath}"):
        for candidate in sorted(root.glob(pattern)):
            return candidate
    if fetch:
        from llamavm.artifacts import source

        cfg = source.load_config()
        tree = source.extract_sdist(cfg, source.fetch_sdist(cfg, root), root)
        candidate = tree / relpath
        if candidate.is_file():
            return candidate
    raise LlamavmError(
        f"no {relpath} under {root}/src — run 'python -m llamavm.artifacts.source prepare' "
        "to fetch the llama.cpp source first"
    )


def find_vocab(cache: Path | None = None, fetch: bool = True, name: str = VOCAB_NAME) -> Path:
    """A vocab GGUF inside the cached llama.cpp source (the SPM one unless `name` says)."""
    return find_in_source(f"models/{name}", cache, fetch)


def write(spec: TinySpec, path: Path, vocab: Path | None = None) -> Path:
    """Write `spec` as a GGUF at `path` (atomically) and return the path."""
    if spec.arch in MOE_ARCHS:
        return _write_moe(spec, path, vocab)
    import numpy as np
    from gguf import GGUFWriter, TokenType

    vocab_fields = gguf_meta.read(vocab or find_vocab()).metadata

    def vocab_field(key: str) -> list:
        return list(vocab_fields[key])

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

    return _finish(writer, tmp, path)


def _finish(writer: Any, tmp: Path, path: Path) -> Path:
    """Write the GGUF out and move it into place."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the character each byte is written as in a token, reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _spell(text: str, pieces: dict[str, int], used: set[int]) -> list[int]:
    """Token ids whose pieces make `text`, none in `used` and none twice (longest pieces first).

    A first-order chain can only say a token once; repeated words are spelled with other pieces.
    """

    def search(at: int, taken: set[int]) -> list[int] | None:
        if at == len(text):
            return []
        for end in range(min(len(text), at + 16), at, -1):
            token = pieces.get(text[at:end])
            if token is None or token in taken:
                continue
            rest = search(end, taken | {token})
            if rest is not None:
                return [token, *rest]
        return None

    found = search(0, set(used))
    if found is None:
        raise LlamavmError(f"tiny model: cannot spell {text!r} with unused tokens; reword it")
    return found


def _chain(spec: TinySpec, tokens: list[str], types: list[int]) -> list[int]:
    """The token ids of the designed answer, starting with the token a chat prompt ends with.

    Only GPT-OSS's `<|channel|>` and `<|message|>` come twice (harmony needs them in both
    headers); the token before each tells the model which header it is in (see _write_moe).
    """
    ids = {text: i for i, text in enumerate(tokens)}
    decode = _byte_decoder()
    pieces: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if types[i] == 1 and all(c in decode for c in text):  # normal byte-level tokens only
            pieces.setdefault(bytes(decode[c] for c in text).decode("utf-8", "replace"), i)
    chain: list[int] = []

    def say(text: str) -> None:
        chain.extend(_spell(text, pieces, set(chain)))

    if spec.arch == "gpt-oss":
        # The prompt ends with "<|start|>assistant"; the answer is harmony: an analysis block,
        # then the final channel, whose "assistant" is spelled with other pieces.
        chain += [ids["assistant"], ids["<|channel|>"]]
        say("analysis")
        chain.append(ids["<|message|>"])
        say(spec.reasoning)
        chain += [ids["<|end|>"], ids["<|start|>"]]
        say("assistant")
        chain.append(ids["<|channel|>"])
        say("final")
        chain.append(ids["<|message|>"])
        say(spec.answer)
        chain.append(ids["<|return|>"])
    else:
        # Qwen's chat prompt ends with "<|im_start|>assistant\n".
        chain.append(ids["Ċ"])
        say(spec.answer)
        chain.append(ids["<|im_end|>"])
    return chain


def _write_moe(spec: TinySpec, path: Path, vocab: Path | None) -> Path:
    """A tiny Qwen3 MoE or GPT-OSS with a designed answer (see the module docstring)."""
    import numpy as np
    from gguf import GGUFWriter

    fields = gguf_meta.read(vocab or find_vocab(name=BPE_VOCAB_NAME)).metadata
    tokens = [str(t) for t in fields["tokenizer.ggml.tokens"]]
    types = [int(t) for t in fields["tokenizer.ggml.token_type"]]
    merges = [str(m) for m in fields["tokenizer.ggml.merges"]]
    pads = [i for i, t in enumerate(tokens) if t.startswith("[PAD")]
    if spec.arch == "gpt-oss":
        for slot, special in zip(pads, HARMONY_TOKENS, strict=False):
            tokens[slot], types[slot] = special, 3  # CONTROL
    template = find_in_source(spec.template).read_text(encoding="utf-8")
    chain = _chain(spec, tokens, types)
    n_vocab, n_embd = len(tokens), spec.n_embd
    head_dim = spec.head_dim or n_embd // spec.n_head
    ids = {text: i for i, text in enumerate(tokens)}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = GGUFWriter(str(tmp), spec.arch)
    writer.add_name(spec.name)
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(spec.n_expert)
    writer.add_expert_used_count(spec.n_expert_used)
    writer.add_expert_feed_forward_length(spec.n_ff_exp)
    if spec.arch == "gpt-oss":
        writer.add_rope_freq_base(150000.0)
        # Layer 0 slides over 2 tokens (the designed head reads the token before); layer 1 is full.
        writer.add_sliding_window(2)
    else:
        writer.add_rope_freq_base(1000000.0)
    writer.add_file_type(1)  # mostly F16
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = "<|return|>" if spec.arch == "gpt-oss" else "<|im_end|>"
    writer.add_bos_token_id(ids["<|endoftext|>"])
    writer.add_eos_token_id(ids[eos])
    writer.add_pad_token_id(ids["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(template)

    rng = np.random.default_rng(spec.seed)

    def rand(*shape: int, dtype: str = "float32") -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    # The chain: each of its tokens is a unit vector on an axis of its own; the output row of
    # the token after it reads that axis, so after RMSNorm (x8 for 64 dims) it scores ~32
    # against ~1 for any other token. GPT-OSS's `<|channel|>` and `<|message|>` come twice:
    # one head of the first layer (a sliding window of 2: the token and the one before it)
    # copies a flag of the token before them, and the next token's row reads that flag too.
    axes = {token: axis for axis, token in enumerate(dict.fromkeys(chain))}
    twice = {t for t in chain if chain.count(t) > 1}
    before = [chain[i - 1] for i in range(1, len(chain)) if chain[i] in twice]
    flags = {token: len(axes) + n for n, token in enumerate(dict.fromkeys(before))}
    if len(axes) + len(flags) > n_embd:
        raise LlamavmError(
            f"tiny model {spec.name}: the designed answer needs {len(axes) + len(flags)} axes, "
            f"more than n_embd ({n_embd}); shorten answer/reasoning or raise n_embd"
        )
    embd = rand(n_vocab, n_embd, dtype="float16")
    output = rand(n_vocab, n_embd, dtype="float16")
    for token, axis in axes.items():
        embd[token] = 0
        embd[token, axis] = 1
    for i in range(1, len(chain)):
        output[chain[i], axes[chain[i - 1]]] += 4
        if chain[i - 1] in twice:
            output[chain[i], flags[chain[i - 2]]] += 4
    writer.add_tensor("token_embd.weight", embd)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    q, kv = spec.n_head * head_dim, spec.n_head_kv * head_dim
    n_exp, n_ff = spec.n_expert, spec.n_ff_exp
    for i in range(spec.n_layer):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        wq, wk, wv, wo = rand(q, n_embd), rand(kv, n_embd), rand(kv, n_embd), rand(n_embd, q)
        if i == 0 and flags:
            # Head 0, on the slowest RoPE pair (dim head_dim/2 - 1: no turn over 2 positions):
            # the repeated tokens ask (q=12), the flagged tokens answer (k=10): a score of 30
            # puts all the weight on the flagged token before; its value lands on its flag axis.
            dim = head_dim // 2 - 1
            for token in twice:
                wq[:head_dim, axes[token]] = 0
                wq[dim, axes[token]] = 1.5
            for n, (token, flag) in enumerate(flags.items()):
                wk[:head_dim, axes[token]] = 0
                wk[dim, axes[token]] = 1.25
                wv[:head_dim, axes[token]] = 0
                wv[n, axes[token]] = 1 / 8
                wo[flag, :head_dim] = 0
                wo[flag, n] = 1
        writer.add_tensor(f"{blk}.attn_q.weight", wq)
        writer.add_tensor(f"{blk}.attn_k.weight", wk)
        writer.add_tensor(f"{blk}.attn_v.weight", wv)
        writer.add_tensor(f"{blk}.attn_output.weight", wo)
        writer.add_tensor(f"{blk}.ffn_gate_inp.weight", rand(n_exp, n_embd))
        writer.add_tensor(f"{blk}.ffn_gate_exps.weight", rand(n_exp, n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_up_exps.weight", rand(n_exp, n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_down_exps.weight", rand(n_exp, n_embd, n_ff))
        if spec.arch == "gpt-oss":
            writer.add_tensor(
                f"{blk}.post_attention_norm.weight", np.ones(n_embd, dtype=np.float32)
            )
            writer.add_tensor(f"{blk}.attn_q.bias", np.zeros(q, dtype=np.float32))
            writer.add_tensor(f"{blk}.attn_k.bias", np.zeros(kv, dtype=np.float32))
            writer.add_tensor(f"{blk}.attn_v.bias", np.zeros(kv, dtype=np.float32))
            writer.add_tensor(f"{blk}.attn_output.bias", np.zeros(n_embd, dtype=np.float32))
            writer.add_tensor(f"{blk}.attn_sinks.weight", np.zeros(spec.n_head, dtype=np.float32))
            writer.add_tensor(f"{blk}.ffn_gate_inp.bias", np.zeros(n_exp, dtype=np.float32))
            writer.add_tensor(f"{blk}.ffn_gate_exps.bias", np.zeros((n_exp, n_ff), np.float32))
            writer.add_tensor(f"{blk}.ffn_up_exps.bias", np.zeros((n_exp, n_ff), np.float32))
            writer.add_tensor(f"{blk}.ffn_down_exps.bias", np.zeros((n_exp, n_embd), np.float32))
        else:
            writer.add_tensor(f"{blk}.attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
            writer.add_tensor(f"{blk}.attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
            writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))

    return _finish(writer, tmp, path)


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
    for entry in entries:
        entry = dict(entry)
        target = share_root / entry.pop("file")
        if not target.exists():
            spec = TinySpec(**entry)
            vocab = find_vocab(name=BPE_VOCAB_NAME if spec.arch in MOE_ARCHS else VOCAB_NAME)
            write(spec, target, vocab)
        written.append(target)
    return written


#: The canary model of the llama_cpp role: a build must serve a token from it before it goes live.
CANARY = TinySpec("llamavm-canary", seed=7)


def canary(cache: Path | None = None) -> Path:
    """The canary GGUF (written once into the controller cache)."""
    path = (cache / "canary" if cache else paths.canary()) / f"{CANARY.name}.gguf"
    if not path.is_file():
        write(CANARY, path)
    return path
