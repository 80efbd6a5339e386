"""This machine as a libvirt hypervisor for the embedded VM (inventories/local-vm).

Real hypervisors run libvirtd under systemd (the hypervisor role). This machine has no systemd
as PID 1, so the daemons are started by hand, as TESTBED.md found works: `virtlogd -d`, then
`libvirtd -d` inside the test bed's LAN namespace, so that a domain's bridged NIC joins the LAN
bridge there; qemu runs as root (else every capability probe takes seconds) and guests run under
TCG (`/dev/kvm` here hangs stock kernels).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamavm.errors import LlamavmError
from llamavm.testbed import config, lan, machine

#: Debian packages the embedded hypervisor needs: Binary -> package.
TOOLS = {
    "libvirtd": "libvirt-daemon-system",
    "virsh": "libvirt-clients",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mmdebstrap": "mmdebstrap",
    "virt-xml-validate": "libvirt-clients",
}
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LIBVIRTD_PID = Path("/run/libvirtd.pid")
VIRTLOGD_PID = Path("/run/virtlogd.pid")
URI = "qemu:///system"


def ensure_tools() -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    print(f"llamavm: installing the embedded hypervisor's packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        raise LlamavmError(f"apt-get install {' '.join(missing)} failed: {run.stderr[-300:]}")


def configure_qemu() -> bool:
    """qemu as root (see the module doc); True when qemu.conf changed."""
    text = QEMU_CONF.read_text() if QEMU_CONF.exists() else ""
    new = text
    for key in ("user", "group"):
        line = f'{key} = "root"'
        if re.search(rf"^{key}\s*=", new, re.M):
            new = re.sub(rf"^{key}\s*=.*$", line, new, flags=re.M)
        else:
            new += f"\n# llamavm: the embedded hypervisor runs qemu as root\n{line}\n"
    if new != text:
        QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
        QEMU_CONF.write_text(new)
        return True
    return False


def _pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text().strip())
        if Path(f"/proc/{pid}").exists():
            return pid
    return None


def _netns_inode(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    return None


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        ["virsh", "-c", URI, *args], capture_output=True, text=True, check=False, timeout=120
    )
    if check and run.returncode != 0:
        raise LlamavmError(f"virsh {' '.join(args)} failed: {run.stderr.strip()[:300]}")
    return run


def up() -> None:
    """The daemons running, libvirtd inside the LAN namespace (restarted if it is elsewhere)."""
    if os.geteuid() != 0:
        raise LlamavmError("the embedded hypervisor needs root (libvirtd, namespaces)")
    ensure_tools()
    cfg = config.load_config()
    lan.up(cfg.lan)
    changed = configure_qemu()
    if _pid(VIRTLOGD_PID) is None:
        subprocess.run(["virtlogd", "-d"], check=True)
    lan_inode = os.stat(f"/run/netns/{cfg.lan.ns_lan}").st_ino
    pid = _pid(LIBVIRTD_PID)
    if pid is not None and _netns_inode(pid) != lan_inode:
        # The LAN was made anew (test bed down/up): libvirtd and its guests sit on the old one,
        # which nothing can reach. Power the guests off; provisioning starts them on the new.
        _kill_namespace(_netns_inode(pid))
        pid = None
    if pid is not None and changed:
        stop_libvirtd(pid)
        pid = None
    if pid is None:
        subprocess.run(["ip", "netns", "exec", cfg.lan.ns_lan, "libvirtd", "-d"], check=True)
        deadline = time.monotonic() + 30
        while virsh("version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise LlamavmError("libvirtd did not answer within 30 s — see /var/log/libvirt/")
            time.sleep(0.2)


def ensure_keys(hostvars: dict[str, Any], say: Callable[[str], None] = print) -> None:
    """The embedded lab's SSH key pair: every VM this machine hosts whose
    `llamavm_vm.ssh_public_key_file` is missing gets one made there (the private key beside it,
    0600), the key its inventory logs in with. Only for VMs on this machine: a real site's key
    is the operator's."""
    for host, hv in sorted(hostvars.items()):
        spec = hv.get("llamavm_vm")
        if not isinstance(spec, dict) or spec.get("hypervisor") != "localhost":
            continue
        pub = str(spec.get("ssh_public_key_file") or "")
        if not pub.endswith(".pub") or Path(pub).exists():
            continue
        key = Path(pub[: -len(".pub")])
        if machine.keypair(key, "llamavm-lab"):
            say(f"llamavm: made the embedded lab's SSH key pair {key} (for {host})")


def stop_libvirtd(pid: int | None = None) -> None:
    """Stop libvirtd (its guests keep running; they are qemu processes of their own)."""
    pid = pid or _pid(LIBVIRTD_PID)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def _kill_namespace(inode: int | None) -> None:
    """SIGKILL every process in the network namespace `inode` (a stale LAN's libvirtd, guests)."""
    if inode is None or inode == os.stat("/proc/self/ns/net").st_ino:
        # Never this machine's own namespace: there, only libvirtd itself goes.
        stop_libvirtd()
        return
    victims = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _netns_inode(int(p.name)) == inode
    ]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{v}").exists() for v in victims) and time.monotonic() < deadline:
        time.sleep(0.1)
