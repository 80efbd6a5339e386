#!/usr/bin/python3
"""llamavm-health-gate URL TIMEOUT: the ExecStartPost= of every model unit.

Polls URL (the server's /health) until it answers 200, so the unit becomes active only once the
model is loaded. Gives up at once when the main process is gone ($MAINPID, set by systemd for
ExecStartPost=): a server that dies while loading must not hold the start job for TIMEOUT.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request


def main() -> int:
    url, timeout = sys.argv[1], float(sys.argv[2])
    pid = os.environ.get("MAINPID", "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid and not os.path.exists(f"/proc/{pid}"):
            print(f"llamavm-health-gate: main process {pid} exited while loading", file=sys.stderr)
            return 1
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return 0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    print(f"llamavm-health-gate: {url} not healthy after {timeout:.0f}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
