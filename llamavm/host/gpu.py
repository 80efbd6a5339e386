"""GPU memory from nvidia-smi (empty without a GPU), and waiting for it to be released."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable

#: Used MiB at or below which a GPU counts as released (driver and CUDA context leftovers).
IDLE_MIB = 1024


def memory() -> list[dict[str, int]]:
    """Used/total MiB per GPU."""
    try:
        run = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in run.stdout.splitlines():
        with contextlib.suppress(ValueError):
            used, total = (int(x) for x in line.split(","))
            gpus.append({"used_mib": used, "total_mib": total})
    return gpus


def wait_released(
    baseline: list[dict[str, int]], progress: Callable[[str], None], timeout: float = 30
) -> None:
    """After a stop on a GPU host, wait until the memory is back near idle."""
    if not baseline:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(g["used_mib"] <= IDLE_MIB for g in memory()):
            return
        time.sleep(0.2)
    progress("GPU memory still in use after the old model stopped; continuing")
