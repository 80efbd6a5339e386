"""The outer machine's side: root, the tools the test bed needs (installed when missing), and
running one of them with its output on failure (one helper for the package)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from llamavm.errors import LlamavmError

#: Binary -> Debian package, for the tools `machine.up()` needs on the outer machine.
HOST_TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "setsid": "util-linux",
}


def run(
    cmd: list[str], *, log: Path | None = None, what: str = "", **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run CMD; on failure raise LlamavmError with the tail of its output (or log)."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, **kwargs)
        output = tail(log)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
        output = (proc.stderr or "") + (proc.stdout or "")
    if proc.returncode != 0:
        raise LlamavmError(
            f"{what or cmd[0]} failed (exit {proc.returncode}): `{' '.join(cmd)}`\n"
            f"{output.strip()[-2000:]}"
        )
    return proc


def tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log ("" when it can't be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def require_root() -> None:
    """Refuse clearly when not root."""
    if os.geteuid() != 0:
        raise LlamavmError(
            "the test bed needs root (network namespaces, debootstrap, systemd-nspawn): "
            "run it with sudo"
        )


def ensure_host_tools() -> None:
    """apt-get install whatever tools the test bed needs and the outer machine lacks."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    print(f"llamavm testbed: installing missing host tools: {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(
        ["apt-get", "install", "-y", "--no-install-recommends", *missing],
        env=env,
        what="apt-get install",
    )
