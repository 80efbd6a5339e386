"""Touching the model share without hanging on it.

Everything that touches the model share (NFS in production, mounted `hard`) runs in a forked
child the transaction watches: a share that stops answering leaves the child blocked in the
kernel, not the transaction. No progress for `stall_s` seconds and the child is killed (NFS
waits are killable) and the switch refused — nothing has been stopped yet. What is done with
the bytes (staged or read through) is fetch.py's; the page cache, pagecache.py's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import select
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamavm.host import EXIT_REFUSED, gguf, pagecache
from llamavm.host.contract import HostError

#: Progress lines at most this often (seconds).
REPORT_EVERY_S = 1.0

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
            "resident": pagecache.resident_fraction(path, info.st_size),
        }

    return bounded(work, what=f"reading {path}", stall_s=stall_s)
