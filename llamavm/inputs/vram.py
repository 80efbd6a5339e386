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
    draft    = with `draft: COMPANION`: that companion's weights and KV cache (its n_gpu_layers and
               cache_type, this model's ctx_size: the draft keeps a context as long), or its
               vram_mib override
    total    = weights + kv + compute + draft  (or the model's vram_mib override)
    fits     = total <= settings.vram.budget_mib - settings.vram.reserve_mib

The admission of companions (catalog entries with `companion: true`), per big model, in catalog
order: a companion runs beside it while

    big total + the companions kept so far + this companion's total + reserve <= budget

and is stopped while that big model serves otherwise. A companion without an estimate is never
admitted (nothing proves it fits). The companions together must fit on their own:

    sum of the companions' totals + reserve <= budget        (or the catalog is refused)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from llamavm import paths
from llamavm.errors import LlamavmError
from llamavm.inputs import gguf_meta
from llamavm.inputs.catalog import Catalog, Model

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


class AdmissionError(LlamavmError):
    """The companions do not fit the GPU together; the message names the numbers."""

    exit_code = 2


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
    #: The draft model's share of total_mib (None: no draft).
    draft_mib: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- reading the header ---------------------------------------------------------------------


def read_gguf(path: str | Path) -> GGUFInfo:
    """Read metadata and the tensor table (never the weights) of a GGUF, split files included.

    Kept per version of the file(s) (path, size, mtime, inode of every shard) in
    $LLAMAVM_CACHE/gguf/: every provision and `invoke models` estimates every model, and even
    read from a memory map (llamavm.inputs.gguf_meta) a 200k-token vocabulary with its merges is a
    good share of a second."""
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
    return paths.gguf_headers()


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
    fields = first.metadata
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
    tensors = [Tensor(t.name, t.n_bytes) for t in first.tensors]
    for shard in shards[1:]:
        tensors.extend(Tensor(t.name, t.n_bytes) for t in _open(shard).tensors)
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


def _open(path: Path) -> gguf_meta.Header:
    if not path.exists():
        raise GGUFError(
            f"{path}: GGUF not found — check the path and that the model share is mounted"
        )
    try:
        header = gguf_meta.read(path)
        for tensor in header.tensors:  # a type this gguf does not know is not a model to size
            _ = tensor.n_bytes
        return header
    except PermissionError:
        raise GGUFError(f"{path}: GGUF not readable — fix its permissions") from None
    except (ValueError, IndexError, OSError, KeyError, struct.error) as exc:
        raise GGUFError(
            f"{path}: not a valid GGUF ({exc}) — re-download or re-convert it"
        ) from None


def _field(fields: dict[str, Any], key: str, path: Path, default: Any = ...) -> Any:
    if key not in fields:
        if default is ...:
            raise GGUFError(f"{path}: GGUF metadata lacks {key} — not a model llamavm can size")
        return default
    return fields[key]


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
    try:
        info = info or _local_info(catalog, model)
        draft = draft_bytes(catalog, model)
    except GGUFError as exc:
        return Estimate(
            model=model.name,
            verdict="unknown",
            available_mib=available,
            source="unreachable",
            reason=str(exc),
        )
    weights, kv, compute = gpu_bytes(info, model, vram.compute_mib)
    total = (weights + kv + compute + (draft or 0)) / MIB
    result = Estimate(
        model=model.name,
        verdict="fits" if total <= available else "over budget",
        available_mib=available,
        weights_mib=weights / MIB,
        kv_mib=kv / MIB,
        compute_mib=compute / MIB,
        total_mib=total,
        draft_mib=None if draft is None else draft / MIB,
    )
    if result.verdict == "over budget" and info.is_moe:
        result = replace(result, suggested_n_cpu_moe=suggest_n_cpu_moe(catalog, model, info))
    return result


def _local_info(catalog: Catalog, model: Model) -> GGUFInfo:
    local = catalog.local_gguf(model)
    if local is None:
        raise GGUFError(
            "the controller cannot see the model share "
            f"(set settings.controller_share_path, or vram_mib for {model.name})"
        )
    return read_gguf(local)


def draft_bytes(catalog: Catalog, model: Model) -> int | None:
    """What `model`'s draft companion adds to its server's GPU memory (None: no draft): the
    draft's weights and a KV cache as long as `model`'s context (no compute buffers of its
    own are counted: the draft runs in the server's), or its vram_mib override."""
    if model.draft is None:
        return None
    draft = catalog.resolve(model.draft)
    if draft.vram_mib is not None:
        return draft.vram_mib * MIB
    try:
        info = _local_info(catalog, draft)
    except GGUFError as exc:
        raise GGUFError(f"draft {draft.name}: {exc}") from None
    weights, kv, _ = gpu_bytes(info, replace(draft, ctx_size=model.ctx_size, n_cpu_moe=0), 0)
    return weights + kv


def suggest_n_cpu_moe(catalog: Catalog, model: Model, info: GGUFInfo) -> int | None:
    """The smallest n_cpu_moe at or above the model's that fits the budget, or None."""
    vram = catalog.settings.vram
    available = (vram.budget_mib - vram.reserve_mib) * MIB
    draft = draft_bytes(catalog, model) or 0
    for n in range(model.n_cpu_moe, info.n_layer + 1):
        trial = replace(model, n_cpu_moe=n)
        if sum(gpu_bytes(info, trial, vram.compute_mib)) + draft <= available:
            return n
    return None


# --- companions beside the big model ---------------------------------------------------------


def _mib(value: float) -> str:
    return f"{value:.0f} MiB"


def check_companions(catalog: Catalog, totals: Mapping[str, float | None]) -> None:
    """Refuse (AdmissionError, one line with the numbers) companions that do not fit the GPU
    together, whatever big model serves. `totals`: each model's estimate in MiB (None:
    unknown; those are never admitted, so they are left out of the sum)."""
    known = [(m.name, totals.get(m.name)) for m in catalog.companions]
    parts = [(name, total) for name, total in known if total is not None]
    vram = catalog.settings.vram
    need = sum(total for _, total in parts) + vram.reserve_mib
    if parts and need > vram.budget_mib:
        terms = " + ".join(f"{name} {_mib(total)}" for name, total in parts)
        raise AdmissionError(
            f"{catalog.path}: companions: {terms} + reserve {vram.reserve_mib} MiB = "
            f"{_mib(need)} > budget {vram.budget_mib} MiB (settings.vram.budget_mib) — the "
            "companions do not fit the GPU together: drop one, shrink one (ctx_size, "
            "n_gpu_layers), or make one a big model"
        )


def admission(catalog: Catalog, totals: Mapping[str, float | None]) -> dict[str, dict[str, Any]]:
    """Per big model: the companions that run beside it (catalog order, each while the sum
    fits) and, for the others, why not — {"beside": [...], "stopped": {name: reason}}."""
    vram = catalog.settings.vram
    out: dict[str, dict[str, Any]] = {}
    for big in catalog.big:
        beside: list[str] = []
        stopped: dict[str, str] = {}
        total = totals.get(big.name)
        used = total or 0.0
        for companion in catalog.companions:
            own = totals.get(companion.name)
            if total is None or own is None:
                whose = big.name if total is None else companion.name
                stopped[companion.name] = (
                    f"no VRAM estimate for {whose} (set vram_mib for it, or "
                    "settings.controller_share_path), so nothing shows the set fits"
                )
                continue
            need = used + own + vram.reserve_mib
            if need <= vram.budget_mib:
                beside.append(companion.name)
                used += own
                continue
            kept = "".join(f" + {name} {_mib(totals[name] or 0)}" for name in beside)
            stopped[companion.name] = (
                f"{big.name} {_mib(total)}{kept} + {companion.name} {_mib(own)} + reserve "
                f"{vram.reserve_mib} MiB = {_mib(need)} > budget {vram.budget_mib} MiB"
            )
        out[big.name] = {"beside": beside, "stopped": stopped}
    return out
