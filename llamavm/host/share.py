"""Getting a model's bytes local before the serving model is stopped.

Everything that touches the model share (NFS in production, mounted `hard`) runs in a forked
child the transaction watches: a share that stops answering leaves the child blocked in the
kernel, not the transaction. No progress for `stall_s` seconds and the child is killed (NFS
waits are killable) and the switch refused — nothing has been stopped yet.

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
import ctypes
import ctypes.util
import errno
import hashlib
import json
import mmap
import os
import pwd
import select
import shutil
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llamavm.host import EXIT_REFUSED, gguf, store
from llamavm.host.contract import Contract, HostError, Model

CHUNK = 4 << 20
#: A file at least this much in the page cache counts as warm: its pre-warm read is skipped.
WARM_FRACTION = 0.98
#: Progress lines at most this often (seconds).
REPORT_EVERY_S = 1.0
#: Kept free on the staging file system beyond the copy itself.
STAGE_RESERVE_BYTES = 1 << 30

Report = Callable[[int], None]


class ShareError(HostError):
    """The share did not answer, or answered with an error (refuses the switch)."""

    def __init__(self, message: str, errno_name: str = "") -> None:
        super().__init__(message, EXIT_REFUSED)
        self.errno_name = errno_name


def file_key(info: os.stat_result | dict[str, Any]) -> str:
    """One version of a file: inode, size and modification time."""
    if isinstance(info, dict):
        return f"{info['ino']}:{info['size']}:{info['mtime_ns']}"
    return f"{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"


# --- the watched child ----------------------------------------------------------------------------


def bounded(
    work: Callable[[Report], dict[str, Any]],
    *,
    what: str,
    stall_s: float,
    total: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run `work` in a forked child; return its result, or raise ShareError.

    `work` calls its argument with the bytes done so far; each call counts as progress. With
    `progress` and `total`, a line (bytes, rate, ETA) goes out at most once a second.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into the caller's code
        os.close(read_fd)
        code = 0
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)

            def report(done: int) -> None:
                os.write(write_fd, f"p {done}\n".encode())

            result = work(report)
            os.write(write_fd, b"r " + json.dumps(result).encode() + b"\n")
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "")
            message = json.dumps({"errno": name, "message": exc.strerror or str(exc)})
            with contextlib.suppress(OSError):
                os.write(write_fd, b"e " + message.encode() + b"\n")
        except BaseException as exc:
            message = json.dumps({"errno": "", "message": f"{type(exc).__name__}: {exc}"})
            with contextlib.suppress(OSError):
                os.write(write_fd, b"e " + message.encode() + b"\n")
            code = 1
        os._exit(code)
    os.close(write_fd)
    began = last_report = time.monotonic()
    done, buffer = 0, b""
    try:
        while True:
            ready, _, _ = select.select([read_fd], [], [], stall_s)
            if not ready:
                raise ShareError(
                    f"{what}: no progress for {stall_s:g}s — the model share is unreachable "
                    "or stalled (check the NFS server and the network)",
                    "ETIMEDOUT",
                )
            chunk = os.read(read_fd, 65536)
            if not chunk:
                raise ShareError(f"{what}: the reader died without an answer")
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                kind, _, body = line.decode().partition(" ")
                if kind == "p":
                    done = int(body)
                elif kind == "r":
                    return dict(json.loads(body))
                elif kind == "e":
                    failure = json.loads(body)
                    raise ShareError(f"{what}: {failure['message']}", failure["errno"])
            now = time.monotonic()
            if progress and total and now - last_report >= REPORT_EVERY_S:
                last_report = now
                progress(rate_line(what, done, total, now - began))
    finally:
        os.close(read_fd)
        _reap(pid)


def _reap(pid: int) -> None:
    """Kill the child if it still runs and collect it (give up on it after 10 s: a reader
    stuck in a dead hard mount can't die)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    pause = 0.0005
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def rate_line(what: str, done: int, total: int, seconds: float) -> str:
    rate = done / seconds if seconds > 0 else 0.0
    eta = f", ETA {(total - done) / rate:.0f}s" if rate > 0 and done < total else ""
    return f"{what}: {done / 2**30:.2f}/{total / 2**30:.2f} GiB, {rate / 1e6:.0f} MB/s{eta}"


# --- looking at a file on the share ---------------------------------------------------------------


def readable_by(path: Path, user: str) -> bool:
    """Can `user` read `path`, judging by mode bits along the whole path (root reads all)?"""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return os.access(path, os.R_OK)
    groups = {entry.pw_gid, *os.getgrouplist(user, entry.pw_gid)}
    for part in [*reversed(path.parents), path]:
        info = part.stat()
        bits = (0o400, 0o040, 0o004) if part == path else (0o100, 0o010, 0o001)
        if info.st_uid == entry.pw_uid:
            allowed = info.st_mode & bits[0]
        elif info.st_gid in groups:
            allowed = info.st_mode & bits[1]
        else:
            allowed = info.st_mode & bits[2]
        if not allowed:
            return False
    return True


def inspect(
    path: Path, service_user: str, stall_s: float, header_checked: str | None = None
) -> dict[str, Any]:
    """stat, readability by the service user, the GGUF header — in a watched child.

    `header_checked`: the version of the file (file_key) whose header passed before; that
    version's header is not read again (a 152k-token vocab takes ~40 ms)."""

    def work(report: Report) -> dict[str, Any]:
        info = path.stat()
        report(0)
        with path.open("rb"):
            pass
        readable = readable_by(path, service_user)
        header = ""
        try:
            if file_key(info) != header_checked:
                gguf.check_header(path, info.st_size)
        except (ValueError, struct.error) as exc:
            header = str(exc)
        return {
            "size": info.st_size,
            "ino": info.st_ino,
            "mtime_ns": info.st_mtime_ns,
            "readable": readable,
            "header": header,
            "resident": resident_fraction(path, info.st_size),
        }

    return bounded(work, what=f"reading {path}", stall_s=stall_s)


def resident_fraction(path: Path, size: int) -> float | None:
    """How much of the file is in the page cache (mincore), None where that can't be told."""
    if size == 0:
        return 1.0
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_long,
        ]  # fmt: skip
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = (ctypes.c_ubyte * pages)()
        with path.open("rb") as handle:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
        if address in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            if libc.mincore(address, size, vector) != 0:
                return None
        finally:
            libc.munmap(address, size)
        return (pages - bytes(vector).count(0)) / pages  # bit 0 is the only one set
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def memory_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where it can't be read)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def read_window(size: int, available: int | None) -> int | None:
    """How far a read-ahead may run ahead of the server: None (unbounded) when the whole file
    fits comfortably in the page cache beside the server's own copy of it, else a window of a
    quarter of the available memory (at least 64 MiB). Reading a file bigger than memory all
    the way ahead would evict the parts the server has not read yet: the share would be read
    twice."""
    if available is None or size <= available // 2:
        return None
    return max(16 * CHUNK, available // 4)


def server_offset(pid: int, path: Path) -> int | None:
    """Where process `pid` is reading `path` (the file offset of its descriptor on it), None
    while it has none open (not yet, or it mapped the file and closed it)."""
    want = os.path.realpath(path)
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") != want:
                    continue
                for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                    if line.startswith("pos:"):
                        return int(line.split()[1])
    return None


def read_ahead(
    path: Path,
    resident_enough: float = WARM_FRACTION,
    server_pid: int | None = None,
    available: int | None = None,
) -> int | None:
    """Fork a child that reads `path` sequentially into the page cache, ahead of a server that
    loads it; its PID (None when the file is cached already or unreadable). The child reads
    and drops what it read: nothing is kept but the page cache.

    A file that fits in memory is read at the share's own pace; a bigger one stays within a
    window ahead of where the server (`server_pid`) reads it, so nothing read ahead is evicted
    before the server gets to it (without a server to follow, it stops at the window)."""
    try:
        size = path.stat().st_size
    except OSError:
        return None
    fraction = resident_fraction(path, size)
    if fraction is not None and fraction >= resident_enough:
        return None
    window = read_window(size, memory_available() if available is None else available)
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        with contextlib.suppress(OSError, AttributeError):
            os.nice(5)  # the server's own work comes first
        with path.open("rb", buffering=0) as handle:
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            buffer = bytearray(CHUNK)
            done = 0
            while True:
                if window is not None:
                    ahead_of = (server_offset(server_pid, path) if server_pid else None) or 0
                    if done >= ahead_of + window:
                        if not server_pid or not os.path.exists(f"/proc/{server_pid}"):
                            break
                        time.sleep(0.05)
                        continue
                read = handle.readinto(buffer)
                if not read:
                    break
                done += read
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def stop_reader(pid: int | None) -> None:
    """Kill and reap a read_ahead child (done or not)."""
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


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
                buffer = bytearray(CHUNK)
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
    if (source.get("resident") or 0) >= WARM_FRACTION and (sha_known or not model.sha256):
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
        "cold": (source.get("resident") or 0) < WARM_FRACTION,
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
