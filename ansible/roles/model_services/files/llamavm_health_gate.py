#!/usr/bin/python3
"""llamavm-health-gate URL TIMEOUT: the ExecStartPost= of every model unit.

Polls URL (the server's /health) until it answers 200, so the unit becomes active only once the
model is loaded. Gives up at once when the main process is gone ($MAINPID, set by systemd for
ExecStartPost=): a server that dies while loading must not hold the start job for TIMEOUT.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def healthy(host: str, port: int, path: str) -> bool:
    """GET path answers 200 (a raw HTTP/1.0 request: urllib's imports cost 50 ms)."""
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            status_line = conn.recv(64).split(b"\r\n", 1)[0]
            return status_line.split(b" ")[1:2] == [b"200"]
    except OSError:
        return False


def main() -> int:
    url, timeout = sys.argv[1], float(sys.argv[2])
    hostport, _, path = url.split("://", 1)[1].partition("/")
    host, _, port = hostport.rpartition(":")
    pid = os.environ.get("MAINPID", "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid and not os.path.exists(f"/proc/{pid}"):
            print(f"llamavm-health-gate: main process {pid} exited while loading", file=sys.stderr)
            return 1
        if healthy(host, int(port), "/" + path):
            return 0
        time.sleep(0.01)
    print(f"llamavm-health-gate: {url} not healthy after {timeout:.0f}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
