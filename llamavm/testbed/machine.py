"""The local test bed's host: a Debian systemd host under systemd-nspawn on a private LAN, a
copy of the cached rootfs with its own host keys, reached over SSH with the controller's key.

`python -m llamavm.testbed {up,down,status,ssh,client}`, or import `up()`, `down()`, `status()`,
`ssh()` and `client_run()` from here. Data lives in config/testbed.yaml; the rootfs cache in
llamavm.paths.rootfs()/<key>/; runtime state (machine rootfs, SSH key, known_hosts, pid file,
logs) in llamavm.paths.testbed().
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamavm import proc
from llamavm.errors import LlamavmError
from llamavm.testbed import config, lan, localinv, nspawn, rootfs, tools

#: The file that marks the machine's copy of the rootfs, holding the rootfs key it was made of.
MACHINE_STAMP = ".llamavm-machine"


@dataclass
class TestbedInfo:
    """What `up()` brought up: enough to reach the host."""

    __test__ = False  # not a pytest test class

    name: str
    host_address: str
    controller_address: str
    client_address: str
    ssh_user: str
    ssh_port: int
    ssh_key: str
    known_hosts: str
    pid: int
    machine_dir: str
    rootfs_key: str
    cold_build: bool = False
    ssh_command: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ssh_base_command(cfg: config.TestbedConfig, paths: config.Paths) -> list[str]:
    """ssh options that reach the host as the admin user with our key and known_hosts."""
    return [
        "ssh",
        "-i", str(paths.key),
        "-p", str(cfg.ssh_port),
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={paths.known_hosts}",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "ConnectTimeout=5",
        "-o", "LogLevel=ERROR",
        f"{cfg.admin_user}@{cfg.lan.host}",
    ]  # fmt: skip


def ensure_keypair(paths: config.Paths) -> None:
    """The controller's ed25519 key pair for the test bed (no passphrase, 0600)."""
    keypair(paths.key, "llamavm-testbed")


def keypair(key: Path, comment: str) -> bool:
    """An ed25519 key pair at `key` and `key`.pub (no passphrase, 0600, its folder 0700); a
    missing .pub is derived from the private key. True when something was made."""
    key.parent.mkdir(parents=True, exist_ok=True)
    key.parent.chmod(0o700)
    made = False
    if not key.exists():
        proc.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
            what="ssh-keygen",
        )
        made = True
    key.chmod(0o600)
    pub = key.with_name(key.name + ".pub")
    if not pub.exists():
        run = proc.run(["ssh-keygen", "-y", "-f", str(key)], what="ssh-keygen -y")
        pub.write_text(run.stdout)
        made = True
    return made


def ensure_machine(cfg: config.TestbedConfig, paths: config.Paths, base: Path) -> None:
    """The machine's own rootfs: a copy of the cache, made once and kept across down/up."""
    stamp = paths.machine / MACHINE_STAMP
    if stamp.exists() and stamp.read_text().strip() != cfg.rootfs_key:
        print(
            "llamavm testbed: the rootfs package set changed; recreating the machine "
            "(provisioned state is lost)",
            flush=True,
        )
        shutil.rmtree(paths.machine)
    if not stamp.exists():
        tmp = paths.state / "machine.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        if paths.machine.exists():
            shutil.rmtree(paths.machine)
        proc.run(["cp", "-a", "--reflink=auto", str(base), str(tmp)], what="copy rootfs")
        (tmp / rootfs.COMPLETE_STAMP).unlink(missing_ok=True)
        proc.run(["ssh-keygen", "-A", "-f", str(tmp)], what="ssh-keygen -A")
        (tmp / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
        (tmp / MACHINE_STAMP).write_text(cfg.rootfs_key + "\n")
        os.rename(tmp, paths.machine)
    root = paths.machine
    # Per-up settings: they follow config/testbed.yaml and the key pair.
    configure_host(cfg, paths, root, cfg.lan.host, "the test-bed LAN")
    paths.known_hosts.write_text("".join(known_hosts_lines(cfg, root, cfg.lan.host)))


def configure_host(
    cfg: config.TestbedConfig, paths: config.Paths, root: Path, address: str, what: str
) -> None:
    """A booted host's LAN address (systemd-networkd) and the controller's key for its admin
    user, written into its root before it boots (the test bed's, and each fleet host's)."""
    network = root / "etc" / "systemd" / "network" / f"10-{cfg.lan.host_if}.network"
    network.write_text(
        f"# Written by llamavm: {what} (no gateway, no DNS: air-gapped).\n"
        f"[Match]\nName={cfg.lan.host_if}\n\n[Network]\nAddress={cfg.lan.cidr(address)}\n"
        "LinkLocalAddressing=no\nIPv6AcceptRA=no\nKeepConfiguration=static\n"
    )
    uid, gid = rootfs.user_ids(root, cfg.admin_user)
    ssh_dir = root / "home" / cfg.admin_user / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    auth = ssh_dir / "authorized_keys"
    auth.write_text(Path(f"{paths.key}.pub").read_text())
    auth.chmod(0o600)
    for path in (ssh_dir, auth):
        os.chown(path, uid, gid)


def known_hosts_lines(cfg: config.TestbedConfig, root: Path, address: str) -> list[str]:
    """known_hosts lines pinning the host keys in `root` for `address`."""
    host_keys = sorted((root / "etc" / "ssh").glob("ssh_host_*_key.pub"))
    entry = address if cfg.ssh_port == 22 else f"[{address}]:{cfg.ssh_port}"
    return [f"{entry} {' '.join(k.read_text().split()[:2])}\n" for k in host_keys]


def _start_nspawn(cfg: config.TestbedConfig, paths: config.Paths) -> int:
    """Boot the machine in the background (own session, survives the caller). Its PID."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    paths.models.mkdir(parents=True, exist_ok=True)
    paths.pid_file.unlink(missing_ok=True)
    cmd = [
        "systemd-nspawn",
        f"--directory={paths.machine}",
        "--boot",
        "--register=no",
        "--keep-unit",
        f"--machine={cfg.name}",
        f"--network-namespace-path=/run/netns/{cfg.lan.ns_host}",
        # The host's firewall (nftables) is part of what is provisioned; the capability acts on
        # the container's own network namespace, never this machine's.
        "--capability=CAP_NET_ADMIN",
        f"--bind-ro={paths.models}:{cfg.models_mount}",
        "--console=read-only",
    ]
    with paths.nspawn_log.open("a") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        nspawn.spawn(cmd, cfg.name, paths.pid_file, log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pid = nspawn.read_pid(paths.pid_file)
        if pid is not None:
            return pid
        time.sleep(0.05)
    raise LlamavmError(
        f"systemd-nspawn did not start; tail of {paths.nspawn_log}:\n{tools.tail(paths.nspawn_log)}"
    )


def _wait_for_ssh(cfg: config.TestbedConfig, paths: config.Paths, pid: int) -> None:
    """Wait until the admin user can log in over the LAN, or fail with the boot log's tail."""
    deadline = time.monotonic() + cfg.boot_timeout_s
    last = ""
    while time.monotonic() < deadline:
        if not nspawn.pid_alive(pid):
            raise LlamavmError(
                f"the test-bed container exited during boot; tail of {paths.nspawn_log}:\n"
                f"{tools.tail(paths.nspawn_log)}"
            )
        try:
            with socket.create_connection((cfg.lan.host, cfg.ssh_port), timeout=1):
                pass
        except OSError as exc:
            last = str(exc)
            time.sleep(0.2)
            continue
        proc = subprocess.run(
            [*ssh_base_command(cfg, paths), "-o", "BatchMode=yes", "true"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if proc.returncode == 0:
            return
        last = proc.stderr.strip()
        time.sleep(0.3)
    raise LlamavmError(
        f"SSH on {cfg.lan.host}:{cfg.ssh_port} did not answer within {cfg.boot_timeout_s:.0f} s "
        f"(last error: {last}); tail of {paths.nspawn_log}:\n{tools.tail(paths.nspawn_log)}"
    )


def _state_processes(cfg: config.TestbedConfig, paths: config.Paths) -> list[int]:
    """PIDs of processes that belong to the test bed: nspawn on our machine, and SSH
    multiplexers whose control sockets live in our state dir (Ansible's ControlPersist)."""
    needles = (str(paths.machine).encode(), str(paths.state / localinv.CONTROL_PATH_DIR).encode())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if any(n in cmdline for n in needles) and nspawn.pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _kill_stale(cfg: config.TestbedConfig, keep: int | None = None) -> list[int]:
    """SIGKILL what is left in the host's namespace of a container whose nspawn died.

    Killing systemd-nspawn alone (say, a session ended by SIGKILL) orphans the container's
    init and services, which keep its addresses and ports: a new container beside them would
    share the namespace with a ghost. `keep` spares the running nspawn's own processes.
    """
    spare = {keep, *(nspawn.children(keep) if keep else [])}
    stale = [pid for pid in nspawn.netns_processes(cfg.lan.ns_host) if pid not in spare]
    for pid in stale:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(nspawn.pid_alive(pid) for pid in stale):
        time.sleep(0.05)
    return stale


def _state_mounts(cfg: config.TestbedConfig, paths: config.Paths) -> list[str]:
    """Mount points in our namespace that belong to the test bed."""
    prefixes = (str(paths.state), *(f"/run/netns/{ns}" for ns in cfg.lan.namespaces()))
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target.startswith(prefixes):
            mounts.append(target)
    return mounts


# --------------------------------------------------------------------------- public API


def leftovers() -> dict[str, list[Any]]:
    """Everything of the test bed that exists now; all lists empty after a complete `down()`."""
    cfg, paths = config.load_config(), config.Paths.from_env()
    found: dict[str, list[Any]] = dict(lan.leftovers(cfg.lan))
    found["processes"] = _state_processes(cfg, paths)
    found["mounts"] = _state_mounts(cfg, paths)
    return found


def up() -> TestbedInfo:
    """Bring the test bed up (building the rootfs if needed); idempotent. How to reach it."""
    tools.require_root()
    tools.ensure_host_tools()
    cfg, paths = config.load_config(), config.Paths.from_env()
    base, built = rootfs.ensure(cfg, paths)
    ensure_keypair(paths)
    lan.up(cfg.lan)
    pid = nspawn.read_pid(paths.pid_file)
    stamp = paths.machine / MACHINE_STAMP
    if pid is not None and stamp.exists() and stamp.read_text().strip() != cfg.rootfs_key:
        # The package list changed under a running test bed: boot the new machine.
        print(
            "llamavm testbed: the rootfs package set changed; stopping the running test bed",
            flush=True,
        )
        nspawn.stop(paths.pid_file, cfg.stop_timeout_s)
        pid = None
    if pid is None:
        stale = _kill_stale(cfg)
        # SSH multiplexers (Ansible's ControlPersist) still talk to the dead container.
        for mux in _state_processes(cfg, paths):
            with contextlib.suppress(ProcessLookupError):
                os.kill(mux, signal.SIGTERM)
        if stale:
            print(
                f"llamavm testbed: killed {len(stale)} leftover processes of a container "
                "whose systemd-nspawn had died",
                file=sys.stderr,
            )
        ensure_machine(cfg, paths, base)
        pid = _start_nspawn(cfg, paths)
    _wait_for_ssh(cfg, paths, pid)
    return TestbedInfo(
        name=cfg.name,
        host_address=cfg.lan.host,
        controller_address=cfg.lan.controller,
        client_address=cfg.lan.client,
        ssh_user=cfg.admin_user,
        ssh_port=cfg.ssh_port,
        ssh_key=str(paths.key),
        known_hosts=str(paths.known_hosts),
        pid=pid,
        machine_dir=str(paths.machine),
        rootfs_key=cfg.rootfs_key,
        cold_build=built,
        ssh_command=ssh_base_command(cfg, paths),
    )


def down(purge: bool = False) -> None:
    """Stop the container and remove the LAN; with purge, delete the machine rootfs too.

    The rootfs cache and the key pair stay. Idempotent.
    """
    tools.require_root()
    cfg, paths = config.load_config(), config.Paths.from_env()
    nspawn.stop(paths.pid_file, cfg.stop_timeout_s)
    _kill_stale(cfg)
    for pid in _state_processes(cfg, paths):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    # What else lives on the LAN goes with it: the embedded hypervisor (libvirtd inside the LAN
    # namespace) and its VMs. Left behind, they would keep a LAN nobody can reach; libvirt
    # finds its guests shut off when it starts again, and provisioning starts them.
    for pid in nspawn.netns_processes(cfg.lan.ns_lan):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    lan.down(cfg.lan)
    for target in sorted(_state_mounts(cfg, paths), reverse=True):
        subprocess.run(["umount", "--lazy", target], check=False, capture_output=True)
    if purge:
        for path in (paths.machine, paths.state / "machine.tmp"):
            if path.exists():
                shutil.rmtree(path)
        paths.known_hosts.unlink(missing_ok=True)


def status() -> dict[str, Any]:
    """running/stopped, PID, addresses, SSH command line, uptime (json-able)."""
    cfg, paths = config.load_config(), config.Paths.from_env()
    pid = nspawn.read_pid(paths.pid_file)
    started = nspawn.process_start_time(pid) if pid else None
    return {
        "name": cfg.name,
        "state": "running" if pid else "stopped",
        "pid": pid,
        "init_pid": next(iter(nspawn.children(pid)), None) if pid else None,
        "uptime_s": round(time.time() - started, 1) if started else None,
        "lan_up": lan.is_up(cfg.lan),
        "addresses": {
            "controller": cfg.lan.controller,
            "host": cfg.lan.host,
            "client": cfg.lan.client,
        },
        "ssh": " ".join(ssh_base_command(cfg, paths)),
        "machine_dir": str(paths.machine),
        "machine_exists": (paths.machine / MACHINE_STAMP).exists(),
        "rootfs_key": cfg.rootfs_key,
        "rootfs_cached": (paths.rootfs(cfg.rootfs_key) / rootfs.COMPLETE_STAMP).exists(),
        "models_dir": str(paths.models),
        "log": str(paths.nspawn_log),
    }


def ssh(argv: list[str]) -> int:
    """SSH to the host as the admin user (interactive when argv is empty); ssh's exit code."""
    cfg, paths = config.load_config(), config.Paths.from_env()
    return subprocess.run([*ssh_base_command(cfg, paths), *argv], check=False).returncode


def client_run(argv: list[str], **subprocess_kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """Run ARGV inside the LAN client's namespace (e.g. curl to the host's LAN address)."""
    cfg = config.load_config()
    if not lan.is_up(cfg.lan):
        raise LlamavmError("the test-bed LAN is down: run `python -m llamavm.testbed up` first")
    subprocess_kwargs.setdefault("check", False)
    return subprocess.run(["ip", "netns", "exec", cfg.lan.ns_client, *argv], **subprocess_kwargs)
