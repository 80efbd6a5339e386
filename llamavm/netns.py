"""Thin helpers around iproute2 for network namespaces and links (one job: run `ip`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from llamavm.errors import LlamavmError

NETNS_DIR = Path("/run/netns")


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip [-n NS] ARGS...`; raise LlamavmError with ip's message when check fails."""
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise LlamavmError(f"`{' '.join(cmd)}` failed: {detail}")
    return proc


def ns_path(name: str) -> Path:
    """The bind-mount path of a named network namespace."""
    return NETNS_DIR / name


def ns_exists(name: str) -> bool:
    """True when `ip netns add NAME` has been done and not undone."""
    return ns_path(name).exists()


def ns_list() -> list[str]:
    """Names of all named network namespaces."""
    proc = ip("netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def ns_ensure(name: str) -> None:
    """Create the namespace NAME (if missing) and bring its loopback up."""
    if not ns_exists(name):
        ip("netns", "add", name)
    ip("link", "set", "lo", "up", ns=name)


def ns_delete(name: str) -> None:
    """Delete the namespace NAME if present (its links go with it)."""
    if ns_exists(name):
        ip("netns", "delete", name)


def link_exists(name: str, ns: str | None = None) -> bool:
    """True when a link NAME exists in NS (or the current namespace)."""
    if ns is not None and not ns_exists(ns):
        return False
    return ip("link", "show", "dev", name, ns=ns, check=False).returncode == 0


def link_names(ns: str | None = None) -> list[str]:
    """Names of the links in NS (or the current namespace), without the @peer suffix."""
    proc = ip("-o", "link", "show", ns=ns, check=False)
    names = []
    for line in proc.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names
