"""A WSL tarball (`invoke wsl.build`, image debian-12-offline) unpacked and booted under
systemd-nspawn as one more host on the test bed's LAN, the way `wsl --import` unpacks it and
WSL boots it with systemd. (What WSL itself adds, its network setup, is a .network file.)"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from llamavm.platforms import wsl
from llamavm.testbed import config, nspawn
from llamavm.testbed import lan as lan_mod

ADDRESS = "10.213.0.40"
NS, PORT = "llamavm-wsl", "lv-wsl"
SSH_PORT = 2222


class Distro:
    """An unpacked WSL tarball booted under systemd-nspawn on the test bed's LAN."""

    def __init__(self, root: Path, key: Path, known_hosts: Path, spec: wsl.WslSpec) -> None:
        self.root, self.key, self.known_hosts, self.spec = root, key, known_hosts, spec
        self.pid_file = root.parent / "nspawn.pid"
        self.log = root.parent / "nspawn.log"

    def ssh_command(self, command: str, host_keys: str = "yes") -> list[str]:
        return [
            "ssh", "-i", str(self.key), "-p", str(SSH_PORT), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", f"StrictHostKeyChecking={host_keys}",
            "-o", "ConnectTimeout=5", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            f"{self.spec.admin_user}@{ADDRESS}", command,
        ]  # fmt: skip

    def run(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.ssh_command(command), capture_output=True, text=True, timeout=timeout, check=False
        )

    def boot(self) -> None:
        cmd = [
            "systemd-nspawn", f"--directory={self.root}", "--boot", "--register=no",
            "--keep-unit", f"--machine={self.spec.name}",
            f"--network-namespace-path=/run/netns/{NS}", "--capability=CAP_NET_ADMIN",
            "--console=read-only",
        ]  # fmt: skip
        with self.log.open("a") as log:
            nspawn.spawn(cmd, self.spec.name, self.pid_file, log)

    def wait_for_ssh(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Trust on first use, as an operator would for a freshly imported distro.
            probe = subprocess.run(
                self.ssh_command("true", host_keys="accept-new"),
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if probe.returncode == 0:
                return
            time.sleep(1)
        tail = self.log.read_text()[-3000:] if self.log.exists() else ""
        raise AssertionError(f"the distro never answered SSH on {SSH_PORT}:\n{tail}")

    def stop(self) -> None:
        if not self.pid_file.exists():
            return
        pid = int(self.pid_file.read_text().strip() or 0)
        if pid:
            subprocess.run(["kill", "-TERM", str(pid)], check=False)  # nspawn: a clean poweroff
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            if Path(f"/proc/{pid}").exists():
                subprocess.run(["kill", "-KILL", str(pid)], check=False)


@contextlib.contextmanager
def booted(out: Path) -> Iterator[Distro]:
    """Build the tarball into `out`, unpack it, boot it on the LAN; stop and remove it after."""
    cfg, paths = config.load_config(), config.Paths.from_env()
    key = Path(f"{paths.key}.pub").read_text().strip()
    spec = wsl.parse(
        "test: host wsl-test",
        "wsl-test",
        {"name": "llamavm-wsl", "image": "debian-12-offline", "ssh_authorized_keys": [key]},
        {"ansible_port": SSH_PORT, "ansible_user": cfg.admin_user},
        [8001, 8002],
    )
    # Under /var/lib (not /tmp): a tree that boots needs real ownership and device nodes.
    work = Path("/var/lib/llamavm/wsl-test")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    built = wsl.build(spec, out)
    assert built.rebuilt and built.tarball.stat().st_size > 50 * 2**20
    again = wsl.build(spec, out)
    assert not again.rebuilt  # same spec, same base: the tarball is kept
    root = work / "root"
    root.mkdir()
    # As `wsl --import` does: the tarball is the root file system.
    subprocess.run(
        ["tar", "--numeric-owner", "-xpzf", str(built.tarball), "-C", str(root)], check=True
    )
    # WSL configures eth0 itself; here the LAN address comes from systemd-networkd.
    (root / "etc" / "systemd" / "network" / "10-lan0.network").write_text(
        f"[Match]\nName=lan0\n\n[Network]\nAddress={ADDRESS}/24\nLinkLocalAddressing=no\n"
    )
    lan_mod.attach(cfg.lan, NS, "lan0", PORT, ADDRESS)
    distro = Distro(root, paths.key, work / "known_hosts", spec)
    distro.boot()
    try:
        distro.wait_for_ssh()
        yield distro
    finally:
        distro.stop()
        lan_mod.detach(cfg.lan, NS, PORT)
        shutil.rmtree(work, ignore_errors=True)
