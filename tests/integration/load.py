"""Load from LAN devices, as the controller runs it: the streaming client
(clients/streams.py) in the LAN client's namespace, its results summed up, and a sampler on the
host that counts the big models' servers meanwhile. Used by tests/integration/test_load.py and
bench/load.py."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamavm.testbed import config, machine

CLIENT = Path(__file__).resolve().parent / "clients" / "streams.py"

#: Runs on the host as root: counts, every 50 ms until ARGV[1] exists, the running llama-servers
#: of big-model units (companions run beside them by design); prints {"samples", "max", "over"}.
SAMPLER = r"""
import json, os, sys, time
stop, samples, top, over = sys.argv[1], 0, 0, []
while not os.path.exists(stop):
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "llama-server":
                    continue
            with open(f"/proc/{pid}/cgroup") as f:
                n += "llamavm-model-" in f.read()
        except OSError:
            pass
    samples, top = samples + 1, max(top, n)
    if n > 1:
        over.append(time.time())
    time.sleep(0.05)
os.unlink(stop)
print(json.dumps({"samples": samples, "max": top, "over": len(over)}))
"""


def ssh(command: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    cfg, paths = config.load_config(), config.Paths.from_env()
    return subprocess.run(
        [*machine.ssh_base_command(cfg, paths), command],
        capture_output=True, text=True, check=False, **kwargs,
    )  # fmt: skip


def run_client(spec: dict[str, Any], key: str | None) -> subprocess.Popen[str]:
    """The client, started in the LAN client's namespace with `spec` on its standard input."""
    env = {**os.environ, "LLAMAVM_KEY": key or ""}
    cfg = config.load_config()
    with tempfile.TemporaryFile("w+") as spec_file:
        json.dump(spec, spec_file)
        spec_file.seek(0)
        return subprocess.Popen(
            ["ip", "netns", "exec", cfg.lan.ns_client, sys.executable, str(CLIENT)],
            stdin=spec_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the load client failed: {err.strip()[-2000:]}")
    return json.loads(out)["bursts"]


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summary(bursts: list[dict[str, Any]]) -> dict[str, Any]:
    results = [r for b in bursts for r in b["results"]]
    ok = [r for r in results if r["ok"]]
    first = [r["first"] for r in ok]
    end = [r["end"] for r in ok]
    seconds = sum(b["seconds"] for b in bursts)
    return {
        "requests": len(results),
        "rps": len(results) / seconds if seconds else float("nan"),
        "first_p50": quantile(first, 0.5),
        "first_p95": quantile(first, 0.95),
        "end_p50": quantile(end, 0.5),
        "end_p95": quantile(end, 0.95),
        "errors": dict(Counter(r["kind"] for r in results if not r["ok"])),
        "samples": [r for r in results if not r["ok"]][:3],
    }


@contextlib.contextmanager
def sampling() -> Iterator[dict[str, Any]]:
    """The host's big-model servers counted every 50 ms while the block runs."""
    stop = f"/run/llamavm-load-sampler-{os.getpid()}"
    cfg, paths = config.load_config(), config.Paths.from_env()
    remote = shlex.join(["sudo", "-n", "python3", "-c", SAMPLER, stop])
    proc = subprocess.Popen(
        [*machine.ssh_base_command(cfg, paths), remote],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: dict[str, Any] = {}
    try:
        yield seen
    finally:
        ssh(shlex.join(["sudo", "-n", "touch", stop]))
        out, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"the sampler failed: {err.strip()[-500:]}")
        seen.update(json.loads(out))
