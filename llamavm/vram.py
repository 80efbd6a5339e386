"""VRAM admission: estimate a model's GPU memory from its GGUF header and judge it against budget.

Only the header is read (metadata and the tensor table); the weights are never touched, so a
60 GB model on an NFS share costs a few megabytes of reads.

The estimate, in bytes (see docs/vram.md for the reasoning and the error bars):

    weights  = sum of the tensors that llama.cpp places on the GPU:
               blocks blk.i for the last min(n_gpu_layers, n_layer) layers, minus the MoE expert
               tensors (ffn_*_exps) of the first n_cpu_moe layers, plus output/output_norm when
               n_gpu_layers > n_layer (token_embd stays in host memory; a model without its own
               output tensor gets a copy of token_embd on the GPU instead)
    kv       = ctx_size x (n_embd_k_gqa + n_embd_v_gqa) x bytes per element of cache_type,
               for each offloaded layer (ctx_size is the server total shared by all slots)
    compute  = settings.vram.compute_mib (llama.cpp's compute buffers)
    total    = weights + kv + compute          (or the model's vram_mib override)
    fits     = total <= settings.vram.budget_mib - settings.vram.reserve_mib
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from llamavm.catalog import Catalog, Model
from llamavm.errors import LlamavmError

MIB = 1024 * 1024

#: Bytes per element of the KV cache types llama.cpp accepts (block size 32 for the quants).
CACHE_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "iq4_nl": 18 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")
# The same tensors llama.cpp's --n-cpu-moe keeps in host memory.
_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(up|down|gate|gate_up)_(ch)?exps")
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFError(LlamavmError):
    """A GGUF file is missing, unreadable or not a GGUF."""


@dataclass(frozen=True)
class Tensor:
    name: str
    n_bytes: int


@dataclass(frozen=True)
class GGUFInfo:
    """What the estimate needs from a GGUF header."""

    path: Path
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]  # one per layer
    key_length: int
    value_length: int
    expert_count: int
    tensors: tuple[Tensor, ...]

    @property
    def is_moe(self) -> bool:
        return self.expert_count > 0 or any(_EXPERT_RE.match(t.name) for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


@dataclass(frozen=True)
class Estimate:
    model: str
    verdict: str  # "fits", "over budget", "unknown"
    available_mib: float
    weights_mib: float | None = None
    kv_mib: float | None = None
    compute_mib: float | None = None
    total_mib: float | None = None
    source: str = "gguf"  # "gguf", "override" or "unreachable"
    reason: str = ""
    suggested_n_cpu_moe: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- reading the header ---------------------------------------------------------------------


def read_gguf(path: str | Path) -> GGUFInfo:
    """Read metadata and the tensor table (never the weights) of a GGUF, split files included.

    Kept per version of the file(s) (path, size, mtime, inode of every shard) in
    $LLAMAVM_CACHE/gguf/: gguf's reader walks a 152k-token vocabulary item by item (seconds
    per model on 2 cores), and every provision and `invoke models` estimates every model."""
    path = Path(path)
    key = _version_key(_shards(path))
    cached = _cache_read(key, path) if key else None
    if cached is not None:
        return cached
    info = _read_gguf(path)
    if key:
        _cache_write(key, info)
    return info


def _cache_dir() -> Path:
    return Path(os.environ.get("LLAMAVM_CACHE") or "/var/cache/llamavm") / "gguf"


def _version_key(shards: list[Path]) -> str | None:
    parts = []
    for shard in shards:
        try:
            st = shard.stat()
        except OSError:
            return None  # missing or unreadable: the real reader says so
        parts.append(f"{shard.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _cache_read(key: str, path: Path) -> GGUFInfo | None:
    try:
        data = json.loads((_cache_dir() / f"{key}.json").read_text(encoding="utf-8"))
        return GGUFInfo(
            path=path,
            architecture=str(data["architecture"]),
            n_layer=int(data["n_layer"]),
            n_embd=int(data["n_embd"]),
            n_head=int(data["n_head"]),
            n_head_kv=tuple(int(x) for x in data["n_head_kv"]),
            key_length=int(data["key_length"]),
            value_length=int(data["value_length"]),
            expert_count=int(data["expert_count"]),
            tensors=tuple(Tensor(str(n), int(b)) for n, b in data["tensors"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_write(key: str, info: GGUFInfo) -> None:
    data = {**asdict(info), "tensors": [[t.name, t.n_bytes] for t in info.tensors]}
    data.pop("path")
    folder = _cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}"
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, folder / f"{key}.json")
    except OSError:
        pass  # an unwritable cache only costs the next run the read


def _read_gguf(path: Path) -> GGUFInfo:
    shards = _shards(path)
    first = _open(shards[0])
    fields = first.fields
    arch = _field(fields, "general.architecture", shards[0])
    if not isinstance(arch, str):
        raise GGUFError(f"{shards[0]}: general.architecture is not a string — not a model GGUF")

    def meta(key: str, default: Any = None) -> Any:
        return _field(fields, f"{arch}.{key}", shards[0], default)

    n_layer = int(meta("block_count"))
    n_embd = int(meta("embedding_length"))
    n_head_raw = meta("attention.head_count")
    n_head = int(max(n_head_raw) if isinstance(n_head_raw, list) else n_head_raw)
    kv_raw = meta("attention.head_count_kv", n_head_raw)
    if isinstance(kv_raw, list):
        n_head_kv = tuple(int(x) for x in kv_raw)
    else:
        n_head_kv = (int(kv_raw),) * n_layer
    head_dim = n_embd // n_head if n_head else 0
    key_length = int(meta("attention.key_length", head_dim))
    value_length = int(meta("attention.value_length", head_dim))
    expert_count = int(meta("expert_count", 0) or 0)
    tensors = [Tensor(t.name, int(t.n_bytes)) for t in first.tensors]
    for shard in shards[1:]:
        tensors.extend(Tensor(t.name, int(t.n_bytes)) for t in _open(shard).tensors)
    return GGUFInfo(
        path=path,
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        key_length=key_length,
        value_length=value_length,
        expert_count=expert_count,
        tensors=tuple(tensors),
    )


def _shards(path: Path) -> list[Path]:
    match = _SPLIT_RE.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    stem = match["stem"]
    return [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _open(path: Path) -> Any:
    # Imported here: numpy and gguf cost a noticeable share of a second to import.
    from gguf import GGUFReader

    if not path.exists():
        raise GGUFError(
            f"{path}: GGUF not found — check the path and that the model share is mounted"
        )
    try:
        return GGUFReader(path)
    except PermissionError:
        raise GGUFError(f"{path}: GGUF not readable — fix its permissions") from None
    except (ValueError, IndexError, OSError, KeyError) as exc:
        raise GGUFError(
            f"{path}: not a valid GGUF ({exc}) — re-download or re-convert it"
        ) from None


def _field(fields: Any, key: str, path: Path, default: Any = ...) -> Any:
    if key not in fields:
        if default is ...:
            raise GGUFError(f"{path}: GGUF metadata lacks {key} — not a model llamavm can size")
        return default
    value = fields[key].contents()
    return value


# --- the estimate ---------------------------------------------------------------------------


def gpu_bytes(info: GGUFInfo, model: Model, compute_mib: int) -> tuple[int, int, int]:
    """(weights, kv, compute) bytes that `model`'s settings put on the GPU."""
    offloaded = min(model.n_gpu_layers, info.n_layer)
    first_gpu_layer = info.n_layer - offloaded
    output_on_gpu = model.n_gpu_layers > info.n_layer
    has_output = any(t.name == "output.weight" for t in info.tensors)

    weights = 0
    for tensor in info.tensors:
        block = _BLOCK_RE.match(tensor.name)
        if block:
            layer = int(block[1])
            if layer < first_gpu_layer:
                continue
            expert = _EXPERT_RE.match(tensor.name)
            if expert and layer < model.n_cpu_moe:
                continue
            weights += tensor.n_bytes
        elif tensor.name.startswith("output") and output_on_gpu:
            weights += tensor.n_bytes
        elif tensor.name == "token_embd.weight" and output_on_gpu and not has_output:
            weights += tensor.n_bytes  # tied embeddings: the output layer is a copy on the GPU

    per_elem = CACHE_TYPE_BYTES[model.cache_type]
    kv = 0.0
    for layer in range(first_gpu_layer, info.n_layer):
        heads_kv = info.n_head_kv[layer] if layer < len(info.n_head_kv) else info.n_head_kv[-1]
        kv += model.ctx_size * heads_kv * (info.key_length + info.value_length) * per_elem
    return weights, int(kv), compute_mib * MIB


def estimate(catalog: Catalog, model: Model, info: GGUFInfo | None = None) -> Estimate:
    """Estimate `model`'s GPU memory and judge it against the catalog's budget."""
    vram = catalog.settings.vram
    available = vram.budget_mib - vram.reserve_mib
    if model.vram_mib is not None:
        verdict = "fits" if model.vram_mib <= available else "over budget"
        return Estimate(
            model=model.name,
            verdict=verdict,
            available_mib=available,
            total_mib=float(model.vram_mib),
            source="override",
            reason="vram_mib set in the catalog",
        )
    if info is None:
        local = catalog.local_gguf(model)
        try:
            if local is None:
                raise GGUFError(
                    "the controller cannot see the model share "
                    "(set settings.controller_share_path, or vram_mib for the model)"
                )
            info = read_gguf(local)
        except GGUFError as exc:
            return Estimate(
                model=model.name,
                verdict="unknown",
                available_mib=available,
                source="unreachable",
                reason=str(exc),
            )
    weights, kv, compute = gpu_bytes(info, model, vram.compute_mib)
    total = (weights + kv + compute) / MIB
    result = Estimate(
        model=model.name,
        verdict="fits" if total <= available else "over budget",
        available_mib=available,
        weights_mib=weights / MIB,
        kv_mib=kv / MIB,
        compute_mib=compute / MIB,
        total_mib=total,
    )
    if result.verdict == "over budget" and info.is_moe:
        result = replace(result, suggested_n_cpu_moe=suggest_n_cpu_moe(catalog, model, info))
    return result


def suggest_n_cpu_moe(catalog: Catalog, model: Model, info: GGUFInfo) -> int | None:
    """The smallest n_cpu_moe at or above the model's that fits the budget, or None."""
    vram = catalog.settings.vram
    available = (vram.budget_mib - vram.reserve_mib) * MIB
    for n in range(model.n_cpu_moe, info.n_layer + 1):
        trial = replace(model, n_cpu_moe=n)
        if sum(gpu_bytes(info, trial, vram.compute_mib)) <= available:
            return n
    return None
