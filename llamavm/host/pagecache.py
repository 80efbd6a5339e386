"""The page cache: how much of a model's file is in it, and a child that reads the file into it
ahead of a server that loads it (the ExecStartPost gate's read-ahead), within a window that
keeps what it read from being evicted before the server gets to it."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import signal
import time
from pathlib import Path

#: One read of a model's file (the pre-warm, the staging copy, the read-ahead).
CHUNK = 4 << 20
#: A file at least this much in the page cache counts as warm: its pre-warm read is skipped.
WARM_FRACTION = 0.98


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
