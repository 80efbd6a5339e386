"""The outer machine's side: root, the tools the test bed needs (installed when missing), and
reading the tail of their logs (running them is llamavm.proc's)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llamavm import proc
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
    proc.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *missing],
        env=env,
        what="apt-get install",
    )
