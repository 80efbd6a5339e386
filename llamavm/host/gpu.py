"""The GPUs as nvidia-smi reports them (none without a GPU), and waiting for memory release.

One query, one parser: the switch (memory release), `llamavm-switch status` and the metrics
sampler all read `sample()`. nvidia-smi prints `[N/A]` / `[Not Supported]` for what a card or
a platform (WSL, some consumer boards) doesn't report: such a field is None, never 0.
"""

from __future__ import annotations

import csv
import subprocess
import time
from collections.abc import Callable
from typing import Any

#: Used MiB at or below which a GPU counts as released (driver and CUDA context leftovers).
IDLE_MIB = 1024

#: nvidia-smi --query-gpu fields, in order, and the key each becomes.
FIELDS = (
    ("index", "index"),
    ("uuid", "uuid"),
    ("name", "name"),
    ("utilization.gpu", "utilization_pct"),
    ("memory.used", "used_mib"),
    ("memory.total", "total_mib"),
    ("temperature.gpu", "temperature_c"),
    ("power.draw", "power_w"),
    ("power.limit", "power_limit_w"),
)
QUERY = [
    "nvidia-smi",
    f"--query-gpu={','.join(f for f, _ in FIELDS)}",
    "--format=csv,noheader,nounits",
]
_TEXT = {"index", "uuid", "name"}


def parse(text: str) -> list[dict[str, Any]]:
    """The GPUs in nvidia-smi's CSV answer to QUERY; malformed lines are skipped."""
    gpus = []
    for row in csv.reader(text.splitlines(), skipinitialspace=True):
        if len(row) != len(FIELDS):
            continue
        gpu: dict[str, Any] = {}
        for (_, key), raw in zip(FIELDS, row, strict=True):
            value = raw.strip()
            if key in _TEXT:
                gpu[key] = value
                continue
            try:
                number = float(value)
            except ValueError:  # [N/A], [Not Supported], [Unknown Error]
                number = None
            gpu[key] = int(number) if number is not None and key.endswith("_mib") else number
        if gpu["used_mib"] is None or gpu["total_mib"] is None:
            continue
        gpus.append(gpu)
    return gpus


def sample(run: Callable[..., Any] = subprocess.run) -> list[dict[str, Any]] | None:
    """The GPUs now; None when nvidia-smi is missing or fails (no GPU, no driver)."""
    try:
        answer = run(QUERY, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if answer.returncode != 0:
        return None
    return parse(answer.stdout)


def memory() -> list[dict[str, int]]:
    """Used/total MiB per GPU (empty without one)."""
    return [{"used_mib": g["used_mib"], "total_mib": g["total_mib"]} for g in sample() or []]


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
