"""Getting a model's bytes local before the serving model is stopped.

Every read of the model share runs in a child the transaction watches (share.bounded): a
share that stops answering refuses the switch, and nothing has been stopped yet.

Two loading modes, per model (the catalog's `load`):
- stage: a verified copy on local disk (size and sha256 checked while copying, written to a
  temporary name, fsynced and renamed: the server never sees a half-written file), evicted
  least-recently-used under a size cap. The server reads only local bytes, so a file replaced
  or a share gone on the server cannot crash it, nor the rollback.
- share: the server reads the share itself (without mmap, so nothing is read from the share
  after the load); the file is read through once into the page cache first (pre-warm).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llamavm.host import EXIT_REFUSED, gguf, pagecache, store
from llamavm.host.contract import Contract, HostError, Model
from llamavm.host.share import Report, ShareError, bounded, file_key

#: Kept free on the staging file system beyond the copy itself.
STAGE_RESERVE_BYTES = 1 << 30


# --- share mode: read it through once -------------------------------------------------------------


def _stream(
    source: Path, want_sha: bool, partial: Path | None = None
) -> Callable[[Report], dict[str, Any]]:
    """Read `source` through once (into the page cache), hashing it if asked, and copying it
    to `partial` (fsynced, mode 0644) when given."""

    def work(report: Report) -> dict[str, Any]:
        digest = hashlib.sha256() if want_sha else None
        done = 0
        out = None
        if partial is not None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            out = os.open(partial, flags, 0o644)
            os.fchmod(out, 0o644)  # whatever the umask: the service user reads it
        try:
            with source.open("rb", buffering=0) as handle:
                with contextlib.suppress(OSError, AttributeError):
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                buffer = bytearray(pagecache.CHUNK)
                view = memoryview(buffer)
                while n := handle.readinto(buffer):
                    if digest:
                        digest.update(view[:n])
                    written = 0
                    while out is not None and written < n:
                        written += os.write(out, view[written:n])
                    done += n
                    report(done)
            if out is not None:
                os.fsync(out)
        finally:
            if out is not None:
                os.close(out)
        return {"bytes": done, "sha256": digest.hexdigest() if digest else None}

    return work


# --- stage mode: a verified local copy ------------------------------------------------------------


def staged_path(contract: Contract, model: Model) -> Path:
    return model.gguf


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def staged_record(contract: Contract, model: Model) -> dict[str, Any] | None:
    """The record of the model's staged copy, if the copy and its record are both there."""
    path = staged_path(contract, model)
    try:
        record = store.read_json(_sidecar(path))
        info = path.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("local_key") != file_key(info):
        return None
    return record


def _staged_models(contract: Contract) -> Iterator[tuple[Model, Path, int, float]]:
    for other in contract.models:
        if other.load != "stage":
            continue
        record = staged_record(contract, other)
        if record is None:
            continue
        path = staged_path(contract, other)
        with contextlib.suppress(OSError):
            yield other, path, path.stat().st_size, float(record.get("used_at", 0))


def _make_room(
    contract: Contract, model: Model, need: int, keep: set[str], progress: Callable[[str], None]
) -> None:
    """Evict least-recently-used staged copies until `need` bytes fit the cap and the disk."""
    directory = contract.stage_dir
    cap = contract.stage_cap_bytes
    candidates = sorted(
        (item for item in _staged_models(contract) if item[0].name != model.name),
        key=lambda item: item[3],
    )
    total = sum(item[2] for item in candidates)

    def free() -> int:
        return shutil.disk_usage(directory).free - STAGE_RESERVE_BYTES

    for other, path, size, _ in candidates:
        if total + need <= cap and free() >= need:
            return
        if other.name in keep:
            continue
        progress(f"evicting the staged copy of {other.name} ({size / 2**30:.2f} GiB)")
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)
        total -= size
    if total + need > cap:
        raise HostError(
            f"{model.name}: staging {need / 2**30:.2f} GiB would pass the cap "
            f"(settings.loading.stage_cap_gib, {cap / 2**30:.1f} GiB; "
            f"{total / 2**30:.2f} GiB held by models in use) — raise the cap, or give the "
            "model 'load: share'",
            EXIT_REFUSED,
        )
    if free() < need:
        raise HostError(
            f"{model.name}: {directory} has {max(free(), 0) / 2**30:.2f} GiB free beyond the "
            f"1 GiB reserve, staging needs {need / 2**30:.2f} GiB — free disk space, or give "
            "the model 'load: share'",
            EXIT_REFUSED,
        )


def touch_staged(contract: Contract, model: Model) -> None:
    """Mark the model's staged copy as just used (LRU)."""
    record = staged_record(contract, model)
    if record is not None:
        record["used_at"] = time.time()
        store.write_json(_sidecar(staged_path(contract, model)), record)


# --- the step the transaction calls ---------------------------------------------------------------


def fetch(
    contract: Contract,
    model: Model,
    source: dict[str, Any] | None,
    keep: set[str],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Make the bytes the server will read local and verified; report what it took.

    `source` is inspect()'s answer for the model's file on the share, None when the share did
    not answer (then only a staged copy can serve). Returns {"cold": bool, "read_bytes",
    "seconds", "from": "share"|"staged"|"page cache"}.
    """
    began = time.monotonic()
    stall = contract.share_stall_s
    if model.load == "stage":
        return _fetch_staged(contract, model, source, keep, progress, began)
    assert source is not None  # the preflight refuses a share model whose share is away
    sha_known = cached_sha(contract, model.source, source)
    if (source.get("resident") or 0) >= pagecache.WARM_FRACTION and (sha_known or not model.sha256):
        return {"cold": False, "read_bytes": 0, "seconds": 0.0, "from": "page cache"}
    want_sha = bool(model.sha256) and not sha_known
    result = bounded(
        _stream(model.source, want_sha),
        what=f"pre-warming {model.name}",
        stall_s=stall,
        total=source["size"],
        progress=progress,
    )
    if want_sha:
        _verify_sha(contract, model, model.source, source, result["sha256"])
    return {
        "cold": (source.get("resident") or 0) < pagecache.WARM_FRACTION,
        "read_bytes": result["bytes"],
        "seconds": round(time.monotonic() - began, 3),
        "from": "share",
    }


def _fetch_staged(
    contract: Contract,
    model: Model,
    source: dict[str, Any] | None,
    keep: set[str],
    progress: Callable[[str], None],
    began: float,
) -> dict[str, Any]:
    target = staged_path(contract, model)
    record = staged_record(contract, model)
    if record is not None and (source is None or record.get("source_key") == file_key(source)):
        if source is None:
            progress(
                f"the model share did not answer; {model.name} serves its staged copy "
                f"(verified {time.strftime('%Y-%m-%d %H:%M', time.localtime(record['staged_at']))})"
            )
        if model.sha256 and record.get("sha256") not in (None, model.sha256):
            raise HostError(
                f"{model.name}: the staged copy does not match the catalog's sha256 and the share "
                "is away — bring the share back",
                EXIT_REFUSED,
            )
        touch_staged(contract, model)
        return {"cold": False, "read_bytes": 0, "seconds": 0.0, "from": "staged"}
    if source is None:
        raise ShareError(
            f"{model.name}: the model share did not answer and no staged copy of the model is "
            "on this host — bring the share back (check the NFS server and the network)"
        )
    store.secure_dir(contract.stage_dir, 0o755)
    _make_room(contract, model, source["size"], keep, progress)
    partial = target.with_name(f".{target.name}.partial")
    progress(f"staging {model.name} ({source['size'] / 2**30:.2f} GiB) to {target}")
    try:
        result = bounded(
            _stream(model.source, True, partial),
            what=f"staging {model.name}",
            stall_s=contract.share_stall_s,
            total=source["size"],
            progress=progress,
        )
        if result["bytes"] != source["size"]:
            raise HostError(
                f"{model.name}: copied {result['bytes']} bytes, the share said "
                f"{source['size']} — the file changed on the server while it was copied; retry",
                EXIT_REFUSED,
            )
        _verify_sha(contract, model, model.source, source, result["sha256"])
        gguf.check_header(partial, result["bytes"])
        os.replace(partial, target)
        _fsync_dir(target.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    info = target.stat()
    now = time.time()
    store.write_json(
        _sidecar(target),
        {
            "model": model.name,
            "source": str(model.source),
            "source_key": file_key(source),
            "local_key": file_key(info),
            "sha256": result["sha256"],
            "size": info.st_size,
            "staged_at": now,
            "used_at": now,
        },
    )
    return {
        "cold": True,
        "read_bytes": result["bytes"],
        "seconds": round(time.monotonic() - began, 3),
        "from": "share",
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_records(contract: Contract) -> dict[str, Any]:
    """What is known of each model file's versions (the sha256 cache): {path: entry}."""
    try:
        data = store.read_json(contract.paths.sha_cache) or {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _file_record(contract: Contract, path: Path) -> dict[str, Any]:
    entry = _file_records(contract).get(str(path))
    return entry if isinstance(entry, dict) else {}


def _update_file_record(contract: Contract, path: Path, **fields: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        data = _file_records(contract)
        entry = data.get(str(path))
        data[str(path)] = {**(entry if isinstance(entry, dict) else {}), **fields}
        store.write_json(contract.paths.sha_cache, data)


def cached_sha(contract: Contract, path: Path, source: dict[str, Any]) -> str | None:
    entry = _file_record(contract, path)
    if entry.get("key") == file_key(source):
        value = entry.get("sha256")
        return value if isinstance(value, str) else None
    return None


def header_checked(contract: Contract, path: Path) -> str | None:
    """The version of `path` (file_key) whose GGUF header passed the last check."""
    value = _file_record(contract, path).get("header")
    return value if isinstance(value, str) else None


def remember_header(contract: Contract, path: Path, source: dict[str, Any]) -> None:
    if header_checked(contract, path) != file_key(source):
        _update_file_record(contract, path, header=file_key(source))


def _verify_sha(
    contract: Contract, model: Model, path: Path, source: dict[str, Any], digest: str | None
) -> None:
    if digest is None:
        return
    _update_file_record(contract, path, key=file_key(source), sha256=digest)
    if model.sha256 and digest != model.sha256:
        raise HostError(
            f"{model.name}: GGUF {path} does not match the catalog's sha256 — re-download the "
            "file or fix sha256",
            EXIT_REFUSED,
        )


def location(contract: Contract, model: Model) -> str:
    """Where the model's bytes are, for status: staged, stale, or on the share."""
    if model.load != "stage":
        return "share"
    record = staged_record(contract, model)
    return "staged" if record is not None else "not staged"
