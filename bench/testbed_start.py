"""Test-bed start times: cold (rootfs build + boot) against warm (cached rootfs) starts.

Run as root with the regular test bed down: `.venv/bin/python bench/testbed_start.py`.
Uses a throwaway cache and state dir (the same LAN names and addresses as the real test bed),
so it measures a true cold build and leaves your cache alone. Prints the times and the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llamavm import paths
from llamavm.errors import LlamavmError
from llamavm.testbed import machine


def timed(label: str, fn: Callable[[], object]) -> float:
    started = time.monotonic()
    fn()
    elapsed = time.monotonic() - started
    print(f"{label:<44} {elapsed:8.1f} s", flush=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--cache",
        help="reuse this LLAMAVM_CACHE (skips the cold build when its rootfs is there)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the throwaway dirs")
    args = parser.parse_args()

    if machine.status()["state"] == "running":
        print("the test bed is running: `python -m llamavm.testbed down` first", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="llamavm-bench-", dir="/var/tmp"))
    os.environ[paths.CACHE_ENV] = args.cache or str(work / "cache")
    os.environ[paths.STATE_ENV] = str(work / "state")
    print(f"cache {paths.cache()}, state {paths.state()}")
    try:
        cold = timed("cold start (build rootfs + copy + boot + ssh)", machine.up)
        timed("stop (down)", machine.down)
        machine.down(purge=True)
        fresh = timed("warm start, fresh machine (copy + boot + ssh)", machine.up)
        machine.down()
        warm = timed("warm start, kept machine (boot + ssh)", machine.up)
        machine.down()
    except LlamavmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        machine.down()
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"ratio cold / warm (kept machine):   {cold / warm:6.1f}x")
    print(f"ratio cold / warm (fresh machine):  {cold / fresh:6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
