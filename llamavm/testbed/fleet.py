"""More model hosts on the test bed's LAN: a local fleet for `inventories/local-fleet`.

Each fleet host is a systemd host like the test bed itself: the same cached rootfs (the lower
layer of an overlay, so four hosts cost four small upper layers, not four copies), booted under
systemd-nspawn in its own network namespace with a veth on the LAN bridge, its own machine-id,
SSH host keys and address (10.213.0.41, .42, ...), the models bound read-only. Hosts are named
fleet-1 .. fleet-N; `up(n)` is idempotent and `down()` powers them off (the upper layers, with
what was provisioned, stay unless purged).

`python -m llamavm.testbed.fleet {up N,down [--purge],status}`; `invoke provision -i local-fleet`
brings the hosts its inventory names up by itself (llamavm_testbed_fleet).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamavm import paths as controller_paths
from llamavm import proc
from llamavm.errors import LlamavmError
from llamavm.testbed import config, lan, localinv, machine, nspawn, rootfs, tools

#: The first fleet host's address is the LAN's .41 (the test bed is .10, VMs .30/.31, WSL .40).
FIRST_HOST = 41
MAX_HOSTS = 8
STAMP = ".llamavm-fleet"


@dataclass(frozen=True)
class FleetHost:
    """Where one fleet host lives: its overlay, its namespace, its address."""

    index: int
    address: str
    state: Path

    @property
    def name(self) -> str:
        return f"fleet-{self.index}"

    @property
    def ns(self) -> str:
        return f"llamavm-f{self.index}"

    @property
    def port(self) -> str:
        return f"lv-f{self.index}"

    @property
    def dir(self) -> Path:
        return self.state / self.name

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def pid_file(self) -> Path:
        return self.dir / "nspawn.pid"

    @property
    def log(self) -> Path:
        return self.dir / "nspawn.log"


def state_dir() -> Path:
    return controller_paths.fleet()


def known_hosts() -> Path:
    """The fleet's known_hosts (every host's own keys, pinned at up())."""
    return state_dir() / localinv.KNOWN_HOSTS


def hosts(count: int, cfg: config.TestbedConfig | None = None) -> list[FleetHost]:
    """The first `count` fleet hosts."""
    if not 1 <= count <= MAX_HOSTS:
        raise LlamavmError(f"a local fleet has 1 to {MAX_HOSTS} hosts, not {count}", code=2)
    cfg = cfg or config.load_config()
    net = cfg.lan.subnet
    return [
        FleetHost(i, str(net.network_address + FIRST_HOST + i - 1), state_dir())
        for i in range(1, count + 1)
    ]


def _mounted(path: Path) -> bool:
    return any(
        line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines()
    )


def _ensure_root(cfg: config.TestbedConfig, paths: config.Paths, lower: Path,
                 host: FleetHost) -> None:  # fmt: skip
    """The host's root: an overlay of the cached rootfs; first time, its own identity."""
    upper, work = host.dir / "upper", host.dir / "work"
    stamp = upper / STAMP
    if stamp.exists() and stamp.read_text().strip() != cfg.rootfs_key:
        # The rootfs changed under this host: its provisioned layer belongs to the old one.
        if _mounted(host.root):
            proc.run(["umount", str(host.root)], what="umount")
        shutil.rmtree(upper)
        shutil.rmtree(work, ignore_errors=True)
    for path in (upper, work, host.root):
        path.mkdir(parents=True, exist_ok=True)
    if not _mounted(host.root):
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        proc.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(host.root)],
            what=f"overlay mount of {host.name}",
        )
    root = host.root
    if not stamp.exists():
        # Its own host keys and machine-id: the rootfs's are shared by every copy of it.
        for key in (root / "etc" / "ssh").glob("ssh_host_*"):
            key.unlink()
        proc.run(["ssh-keygen", "-A", "-f", str(root)], what="ssh-keygen -A")
        (root / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
        (root / rootfs.COMPLETE_STAMP).unlink(missing_ok=True)
        stamp.write_text(cfg.rootfs_key + "\n")
    (root / "etc" / "hostname").write_text(host.name + "\n")
    machine.configure_host(cfg, paths, root, host.address, f"fleet host {host.name}")


def _running(host: FleetHost) -> int | None:
    return nspawn.read_pid(host.pid_file)


def _boot(cfg: config.TestbedConfig, paths: config.Paths, host: FleetHost) -> None:
    cmd = [
        "systemd-nspawn", f"--directory={host.root}", "--boot", "--register=no",
        "--keep-unit", f"--machine={host.name}",
        f"--network-namespace-path=/run/netns/{host.ns}", "--capability=CAP_NET_ADMIN",
        f"--bind-ro={paths.models}:{cfg.models_mount}", "--console=read-only",
    ]  # fmt: skip
    host.pid_file.unlink(missing_ok=True)
    with host.log.open("a") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        nspawn.spawn(cmd, host.name, host.pid_file, log)
    # The wrapper writes the PID file before it execs nspawn: wait for nspawn itself.
    deadline = time.monotonic() + 10
    while _running(host) is None:
        if time.monotonic() > deadline:
            raise LlamavmError(
                f"systemd-nspawn did not start for {host.name}; tail of {host.log}:\n"
                f"{tools.tail(host.log)}"
            )
        time.sleep(0.05)


def _wait_for_ssh(cfg: config.TestbedConfig, paths: config.Paths, host: FleetHost) -> None:
    deadline = time.monotonic() + cfg.boot_timeout_s
    cmd = [
        "ssh", "-i", str(paths.key), "-p", str(cfg.ssh_port), "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts()}", "-o", "StrictHostKeyChecking=yes",
        "-o", "ConnectTimeout=5", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
        f"{cfg.admin_user}@{host.address}", "systemctl is-system-running --wait >/dev/null; true",
    ]  # fmt: skip
    while time.monotonic() < deadline:
        if _running(host) is None:
            raise LlamavmError(
                f"fleet host {host.name} exited during boot; tail of {host.log}:\n"
                f"{tools.tail(host.log)}"
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            if subprocess.run(cmd, capture_output=True, timeout=60, check=False).returncode == 0:
                return
        time.sleep(0.5)
    raise LlamavmError(
        f"fleet host {host.name} never answered SSH at {host.address}; tail of {host.log}:\n"
        f"{tools.tail(host.log)}"
    )


def up(count: int) -> list[FleetHost]:
    """The test bed's LAN with `count` fleet hosts booted on it (the test bed host itself is
    not started: a fleet's builder may be it, `machine.up()` brings it)."""
    tools.require_root()
    tools.ensure_host_tools()
    cfg, paths = config.load_config(), config.Paths.from_env()
    lower, _ = rootfs.ensure(cfg, paths)
    machine.ensure_keypair(paths)
    lan.up(cfg.lan)
    fleet = hosts(count, cfg)
    state_dir().mkdir(parents=True, exist_ok=True)
    state_dir().chmod(0o700)
    for host in fleet:
        if _running(host) is None:
            _ensure_root(cfg, paths, lower, host)
            lan.attach(cfg.lan, host.ns, cfg.lan.host_if, host.port, host.address)
            _boot(cfg, paths, host)
    # known_hosts of every host that exists (a smaller up() keeps the others' entries).
    lines = [
        line
        for host in hosts(MAX_HOSTS, cfg)
        if (host.root / "etc" / "ssh").is_dir()
        for line in machine.known_hosts_lines(cfg, host.root, host.address)
    ]
    known_hosts().write_text("".join(lines))
    with ThreadPoolExecutor(max_workers=len(fleet)) as pool:
        list(pool.map(lambda h: _wait_for_ssh(cfg, paths, h), fleet))
    return fleet


def down(purge: bool = False) -> None:
    """Power every fleet host off, take it off the LAN; `purge` also drops its layer."""
    tools.require_root()
    cfg = config.load_config()
    for host in hosts(MAX_HOSTS, cfg):
        if not host.dir.exists() and not lan.ns_exists(host.ns):
            continue
        nspawn.stop(host.pid_file, cfg.stop_timeout_s)
        if lan.ns_exists(host.ns):
            lan.detach(cfg.lan, host.ns, host.port)
        if _mounted(host.root):
            proc.run(["umount", str(host.root)], what=f"umount {host.name}")
        if purge and host.dir.exists():
            shutil.rmtree(host.dir)
    if purge:
        known_hosts().unlink(missing_ok=True)


def status() -> list[dict[str, Any]]:
    """Every fleet host that exists: address, running or not."""
    return [
        {"name": h.name, "address": h.address, "running": _running(h) is not None}
        for h in hosts(MAX_HOSTS)
        if h.dir.exists()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamavm.testbed.fleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up_p = sub.add_parser("up", help="boot N fleet hosts on the test-bed LAN")
    up_p.add_argument("count", type=int)
    down_p = sub.add_parser("down", help="power the fleet hosts off")
    down_p.add_argument("--purge", action="store_true", help="also drop what was provisioned")
    sub.add_parser("status", help="the fleet hosts as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            for host in up(args.count):
                print(f"{host.name} {host.address}")
        elif args.command == "down":
            down(args.purge)
        else:
            print(json.dumps(status(), indent=2))
    except LlamavmError as exc:
        print(f"llamavm fleetbed: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
