"""A container's processes, seen from the outer machine: systemd-nspawn started in a session and
cgroup of its own with its PID in a file, found again by that file, stopped in order (then
killed), and the processes of a network namespace. The test-bed machine and each fleet host are
booted and stopped through these."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any


def pid_alive(pid: int) -> bool:
    """True when PID runs and is not a zombie (reaping it if it is our child)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_pid(pid_file: Path) -> int | None:
    """The PID of the running systemd-nspawn that `pid_file` names, or None."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if not pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not cmdline or not cmdline[0].endswith(b"systemd-nspawn"):
        return None
    return pid


def children(pid: int) -> list[int]:
    """PID's child processes (for nspawn: the container's init)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def process_start_time(pid: int) -> float | None:
    """Seconds since the epoch at which PID started."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def netns_processes(ns_name: str) -> list[int]:
    """PIDs of every process inside network namespace `ns_name` (by namespace inode)."""
    try:
        inode = os.stat(f"/run/netns/{ns_name}").st_ino
    except OSError:
        return []
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.stat(proc / "ns" / "net").st_ino == inode:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


#: The wrapper every container is started through: records its PID (then nspawn's, by exec)
#: and moves itself into the cgroups of $LLAMAVM_CGROUPS first (see spawn()).
_WRAPPER = 'echo $$ > "$0"; for f in $LLAMAVM_CGROUPS; do echo $$ > "$f" || true; done; exec "$@"'


def own_cgroups(name: str) -> list[str]:
    """A cgroup of its own for container `name`, below ours in each hierarchy systemd uses (the
    named v1 `systemd` one and the unified one): the cgroup.procs files to join.

    nspawn --keep-unit runs the container in the caller's cgroup, and the container's systemd
    makes its units' cgroups below it: two containers in one cgroup make the same
    `system.slice/<unit>` cgroups and move each other's processes (a unit fails with
    219/CGROUP). Best effort: a hierarchy we can't write to is left out."""
    procs = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "name=systemd":
            base = Path("/sys/fs/cgroup/systemd")
        elif controllers == "":
            unified = Path("/sys/fs/cgroup/unified")
            base = unified if unified.is_dir() else Path("/sys/fs/cgroup")
        else:
            continue
        target = base / path.lstrip("/") / f"llamavm-{name}"
        try:
            target.mkdir(exist_ok=True)
        except OSError:
            continue
        procs.append(str(target / "cgroup.procs"))
    return procs


def spawn(cmd: list[str], name: str, pid_file: Path, log: Any) -> None:
    """Start `cmd` (systemd-nspawn) in its own session and cgroup, its PID in `pid_file`.

    setsid -f: a new session whose parent is init, so neither the calling shell's exit nor a
    long-lived caller (pytest) leaves it orphaned or a zombie."""
    env = {**os.environ, "LLAMAVM_CGROUPS": " ".join(own_cgroups(name))}
    subprocess.run(
        ["setsid", "-f", "sh", "-c", _WRAPPER, str(pid_file), *cmd],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, check=True, env=env,
    )  # fmt: skip


def stop(pid_file: Path, timeout_s: float) -> None:
    """Orderly poweroff (SIGTERM to nspawn = SIGRTMIN+3 to the container's init) of the
    container `pid_file` names, then kill; the PID file goes."""
    pid = read_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return
    inits = children(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    if pid_alive(pid):
        print("llamavm testbed: container did not power off in time; killing it", flush=True)
        for child in [*inits, pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
