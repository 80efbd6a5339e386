"""The page cache (llamavm.host.pagecache): how much of a file is in it, and the read-ahead child
of the health gate, which stays a window ahead of the server on a file bigger than memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from llamavm.host import pagecache


def test_resident_fraction_sees_the_page_cache(tmp_path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    assert pagecache.resident_fraction(path, path.stat().st_size) == 1.0
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert pagecache.resident_fraction(path, path.stat().st_size) < 0.5


def test_read_ahead_reads_a_cold_file_in_a_child_and_skips_a_cached_one(tmp_path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(os.urandom(3 * 1024 * 1024))
    # just written: in the page cache, so nothing to read ahead
    assert pagecache.read_ahead(path) is None
    pid = pagecache.read_ahead(path, resident_enough=1.01)  # as if it were cold
    assert pid
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    pagecache.stop_reader(pid)  # already reaped: no error
    assert pagecache.read_ahead(tmp_path / "missing.gguf", resident_enough=1.01) is None


def test_stop_reader_kills_a_reader_that_hangs(tmp_path) -> None:
    fifo = tmp_path / "hung.gguf"
    os.mkfifo(fifo)  # a read that never returns, like a dead hard mount
    pid = pagecache.read_ahead(fifo, resident_enough=1.01)
    assert pid
    pagecache.stop_reader(pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_read_window_is_unbounded_for_a_file_that_fits_and_a_quarter_of_memory_otherwise() -> None:
    gib = 1 << 30
    assert pagecache.read_window(gib, 8 * gib) is None
    assert pagecache.read_window(gib, None) is None  # memory unknown: as before, read it all
    assert pagecache.read_window(60 * gib, 64 * gib) == 16 * gib
    assert pagecache.read_window(gib, gib) == gib // 4
    assert pagecache.read_window(gib, 128 << 20) == 64 << 20  # never less than 64 MiB


def _settled_offset(pid: int, path) -> int | None:
    """The reader's own offset once it stops moving (it paces itself or is done)."""
    last, still = None, 0
    for _ in range(200):
        now = pagecache.server_offset(pid, path)
        still = still + 1 if now == last else 0
        if still >= 5:
            return now
        last = now
        time.sleep(0.02)
    return last


def test_read_ahead_of_a_file_bigger_than_memory_stays_a_window_ahead_of_the_server(
    tmp_path,
) -> None:
    path = tmp_path / "big.gguf"
    with path.open("wb") as handle:
        handle.truncate(160 << 20)
    mib = 1 << 20
    # the "server" opens the file and reads nothing until told to jump to 32 MiB
    server = subprocess.Popen([
        sys.executable, "-c",
        "import os, sys, time; f = open(sys.argv[1], 'rb'); open(sys.argv[2], 'w').close()\n"
        "while not os.path.exists(sys.argv[3]): time.sleep(0.01)\n"
        "f.seek(32 << 20); time.sleep(60)",
        str(path), str(tmp_path / "opened"), str(tmp_path / "go"),
    ])  # fmt: skip
    try:
        while not (tmp_path / "opened").exists():
            time.sleep(0.01)
        # available 200 MiB: the 160 MiB file doesn't fit twice, window = 64 MiB
        pid = pagecache.read_ahead(path, resident_enough=1.01, server_pid=server.pid,
                               available=200 * mib)  # fmt: skip
        assert pid
        try:
            assert _settled_offset(pid, path) == 64 * mib
            (tmp_path / "go").touch()  # the server moves to 32 MiB: the reader follows
            assert _settled_offset(pid, path) == 96 * mib
        finally:
            pagecache.stop_reader(pid)
    finally:
        server.kill()
        server.wait()


def test_read_ahead_without_a_server_stops_at_the_window(tmp_path) -> None:
    path = tmp_path / "big.gguf"
    with path.open("wb") as handle:
        handle.truncate(100 << 20)
    pid = pagecache.read_ahead(path, resident_enough=1.01, available=100 << 20)
    assert pid
    _, status = os.waitpid(pid, 0)  # it ends by itself after 64 MiB
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
