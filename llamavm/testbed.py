"""The local test bed: a Debian systemd host under systemd-nspawn on a private LAN.

`python -m llamavm.testbed {up,down,status,ssh,client}`, or import `up()`, `down()`, `status()`,
`ssh()` and `client_run()`. Data lives in config/testbed.yaml; the rootfs cache in
${LLAMAVM_CACHE:-/var/cache/llamavm}/rootfs/<key>/; runtime state (machine rootfs, SSH key,
known_hosts, pid file, logs) in ${LLAMAVM_STATE:-/var/lib/llamavm}/testbed/.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
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

import yaml

from llamavm import REPO_ROOT, lan, localinv
from llamavm import paths as controller_paths
from llamavm.errors import LlamavmError

CONFIG_PATH = REPO_ROOT / "config" / "testbed.yaml"
#: Bump when the rootfs build or post-install steps change: it is part of the cache key.
BUILD_SCRIPT_VERSION = 1
COMPLETE_STAMP = ".llamavm-rootfs"
MACHINE_STAMP = ".llamavm-machine"

#: Binary -> Debian package, for the tools `up()` needs on the outer machine.
HOST_TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "setsid": "util-linux",
}


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Paths:
    """Where the test bed keeps its cache and state."""

    cache: Path
    state: Path

    @classmethod
    def from_env(cls) -> Paths:
        """Honour $LLAMAVM_CACHE and $LLAMAVM_STATE."""
        return cls(
            cache=controller_paths.cache(),
            state=controller_paths.testbed(),
        )

    @property
    def rootfs_root(self) -> Path:
        return self.cache / "rootfs"

    def rootfs(self, key: str) -> Path:
        return self.rootfs_root / key

    @property
    def models(self) -> Path:
        return self.cache / "models"

    @property
    def machine(self) -> Path:
        return self.state / "machine"

    @property
    def key(self) -> Path:
        return self.state / localinv.SSH_KEY

    @property
    def known_hosts(self) -> Path:
        return self.state / localinv.KNOWN_HOSTS

    @property
    def pid_file(self) -> Path:
        return self.state / "nspawn.pid"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def nspawn_log(self) -> Path:
        return self.logs / "nspawn.log"


@dataclass(frozen=True)
class TestbedConfig:
    """config/testbed.yaml, validated."""

    suite: str
    mirror: str
    mirror_fallback: str
    variant: str
    packages: tuple[str, ...]
    name: str
    hostname: str
    admin_user: str
    password_user: str
    password: str
    models_mount: str
    boot_timeout_s: float
    stop_timeout_s: float
    ssh_port: int
    lan: lan.LanConfig

    @property
    def rootfs_key(self) -> str:
        """Cache key of the rootfs: suite, variant, package set and build script version."""
        material = {
            "suite": self.suite,
            "variant": self.variant,
            "packages": sorted(set(self.packages)),
            "build_script_version": BUILD_SCRIPT_VERSION,
        }
        digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        return f"{self.suite}-{digest[:16]}"


def load_config(path: Path = CONFIG_PATH) -> TestbedConfig:
    """Read and validate config/testbed.yaml."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LlamavmError(f"cannot read {path}: {exc}") from exc
    try:
        machine = raw["machine"]
        packages = raw["packages"]
        if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
            raise TypeError("`packages` must be a list of package names")
        return TestbedConfig(
            suite=str(raw["suite"]),
            mirror=str(raw.get("mirror", "auto")),
            mirror_fallback=str(raw.get("mirror_fallback", "http://deb.debian.org/debian")),
            variant=str(raw.get("variant", "minbase")),
            packages=tuple(packages),
            name=str(machine["name"]),
            hostname=str(machine["hostname"]),
            admin_user=str(machine["admin_user"]),
            password_user=str(machine["password_user"]),
            password=str(machine["password"]),
            models_mount=str(machine["models_mount"]),
            boot_timeout_s=float(machine.get("boot_timeout_s", 120)),
            stop_timeout_s=float(machine.get("stop_timeout_s", 30)),
            ssh_port=int(raw["network"].get("ssh_port", 22)),
            lan=lan.LanConfig.from_dict(raw["network"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LlamavmError(f"{path}: invalid test-bed configuration: {exc!r}") from exc


def resolve_mirror(cfg: TestbedConfig) -> str:
    """The Debian mirror: explicit in the config, else the outer machine's, else the fallback."""
    if cfg.mirror != "auto":
        return cfg.mirror
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        for line in deb822.read_text().splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if "security" not in uri:
                        return uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                uri = next((p for p in parts[1:] if "://" in p), None)
                if uri and "security" not in uri:
                    return uri
    return cfg.mirror_fallback


# --------------------------------------------------------------------------- results


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


# --------------------------------------------------------------------------- helpers


def _run(
    cmd: list[str], *, log: Path | None = None, what: str = "", **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run CMD; on failure raise LlamavmError with the tail of its output (or log)."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, **kwargs)
        output = _tail(log)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
        output = (proc.stderr or "") + (proc.stdout or "")
    if proc.returncode != 0:
        raise LlamavmError(
            f"{what or cmd[0]} failed (exit {proc.returncode}): `{' '.join(cmd)}`\n"
            f"{output.strip()[-2000:]}"
        )
    return proc


def _tail(path: Path, lines: int = 25) -> str:
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
    _run(
        ["apt-get", "install", "-y", "--no-install-recommends", *missing],
        env=env,
        what="apt-get install",
    )


def _pid_alive(pid: int) -> bool:
    """True when PID runs and is not a zombie (reaping it if it is our child)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _read_pid(paths: Paths) -> int | None:
    """The PID of our running systemd-nspawn, or None."""
    try:
        pid = int(paths.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not cmdline or not cmdline[0].endswith(b"systemd-nspawn"):
        return None
    return pid


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _process_start_time(pid: int) -> float | None:
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


def ssh_base_command(cfg: TestbedConfig, paths: Paths) -> list[str]:
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


# --------------------------------------------------------------------------- rootfs


def _chroot(root: Path, *cmd: str, log: Path) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}
    _run(["chroot", str(root), *cmd], log=log, what=f"chroot {cmd[0]}", env=env)


def _post_install(cfg: TestbedConfig, root: Path, log: Path) -> None:
    """Make a fresh debootstrap tree a bootable, SSH-reachable host (machine-independent)."""
    _chroot(
        root,
        "useradd",
        "--create-home",
        "--shell",
        "/bin/bash",
        "--groups",
        "sudo",
        cfg.admin_user,
        log=log,
    )
    sudoers = root / "etc" / "sudoers.d" / cfg.admin_user
    sudoers.write_text(f"{cfg.admin_user} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    _chroot(root, "useradd", "--create-home", "--shell", "/bin/bash", cfg.password_user, log=log)
    subprocess.run(
        ["chroot", str(root), "chpasswd"],
        input=f"{cfg.password_user}:{cfg.password}\n",
        text=True,
        check=True,
        capture_output=True,
    )
    (root / "etc" / "hostname").write_text(f"{cfg.hostname}\n")
    (root / "etc" / "hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{cfg.hostname}\n::1\tlocalhost ip6-localhost\n"
    )
    (root / "etc" / "default" / "locale").write_text("LANG=C.UTF-8\n")
    _chroot(root, "systemctl", "enable", "ssh.service", "systemd-networkd.service", log=log)
    # Nothing on the LAN routes to a network: don't wait for "online" at boot.
    _chroot(root, "systemctl", "mask", "systemd-networkd-wait-online.service", log=log)
    # Host keys and machine-id are per machine (made when the machine copy is made).
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc" / "machine-id").write_text("")
    for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()


def rootfs_cached(cfg: TestbedConfig | None = None, paths: Paths | None = None) -> bool:
    """Whether the rootfs of this package set is built already (up() will not debootstrap)."""
    cfg, paths = cfg or load_config(), paths or Paths.from_env()
    return (paths.rootfs(cfg.rootfs_key) / COMPLETE_STAMP).exists()


def ensure_rootfs(cfg: TestbedConfig, paths: Paths) -> tuple[Path, bool]:
    """The cached rootfs for cfg.rootfs_key, built (atomically) if missing. (path, built?)."""
    final = paths.rootfs(cfg.rootfs_key)
    if rootfs_cached(cfg, paths):
        return final, False
    paths.rootfs_root.mkdir(parents=True, exist_ok=True)
    tmp = paths.rootfs_root / f".build-{cfg.rootfs_key}-{os.getpid()}"
    for stale in (tmp, final):
        if stale.exists():
            shutil.rmtree(stale)
    log = paths.logs / "rootfs-build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    mirror = resolve_mirror(cfg)
    print(
        f"llamavm testbed: building rootfs {cfg.rootfs_key} ({cfg.suite}, {len(cfg.packages)} "
        f"packages, mirror {mirror}); log: {log}",
        flush=True,
    )
    try:
        _run(
            [
                "debootstrap",
                f"--variant={cfg.variant}",
                f"--include={','.join(cfg.packages)}",
                cfg.suite,
                str(tmp),
                mirror,
            ],
            log=log,
            what="debootstrap",
        )
        _post_install(cfg, tmp, log)
        (tmp / COMPLETE_STAMP).write_text(
            json.dumps({"key": cfg.rootfs_key, "packages": sorted(cfg.packages)}) + "\n"
        )
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, True


# --------------------------------------------------------------------------- machine


def ensure_keypair(paths: Paths) -> None:
    """The controller's ed25519 key pair for the test bed (no passphrase, 0600)."""
    keypair(paths.key, "llamavm-testbed")


def keypair(key: Path, comment: str) -> bool:
    """An ed25519 key pair at `key` and `key`.pub (no passphrase, 0600, its folder 0700); a
    missing .pub is derived from the private key. True when something was made."""
    key.parent.mkdir(parents=True, exist_ok=True)
    key.parent.chmod(0o700)
    made = False
    if not key.exists():
        _run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
            what="ssh-keygen",
        )
        made = True
    key.chmod(0o600)
    pub = key.with_name(key.name + ".pub")
    if not pub.exists():
        run = _run(["ssh-keygen", "-y", "-f", str(key)], what="ssh-keygen -y")
        pub.write_text(run.stdout)
        made = True
    return made


def user_ids(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        parts = line.split(":")
        if parts[0] == user:
            return int(parts[2]), int(parts[3])
    raise LlamavmError(f"user {user!r} is missing from the rootfs {root}")


def ensure_machine(cfg: TestbedConfig, paths: Paths, rootfs: Path) -> None:
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
        _run(["cp", "-a", "--reflink=auto", str(rootfs), str(tmp)], what="copy rootfs")
        (tmp / COMPLETE_STAMP).unlink(missing_ok=True)
        _run(["ssh-keygen", "-A", "-f", str(tmp)], what="ssh-keygen -A")
        (tmp / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
        (tmp / MACHINE_STAMP).write_text(cfg.rootfs_key + "\n")
        os.rename(tmp, paths.machine)
    root = paths.machine
    # Per-up settings: they follow config/testbed.yaml and the key pair.
    configure_host(cfg, paths, root, cfg.lan.host, "the test-bed LAN")
    paths.known_hosts.write_text("".join(known_hosts_lines(cfg, root, cfg.lan.host)))


def configure_host(cfg: TestbedConfig, paths: Paths, root: Path, address: str, what: str) -> None:
    """A booted host's LAN address (systemd-networkd) and the controller's key for its admin
    user, written into its root before it boots (the test bed's, and each fleet host's)."""
    network = root / "etc" / "systemd" / "network" / f"10-{cfg.lan.host_if}.network"
    network.write_text(
        f"# Written by llamavm: {what} (no gateway, no DNS: air-gapped).\n"
        f"[Match]\nName={cfg.lan.host_if}\n\n[Network]\nAddress={cfg.lan.cidr(address)}\n"
        "LinkLocalAddressing=no\nIPv6AcceptRA=no\nKeepConfiguration=static\n"
    )
    uid, gid = user_ids(root, cfg.admin_user)
    ssh_dir = root / "home" / cfg.admin_user / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    auth = ssh_dir / "authorized_keys"
    auth.write_text(Path(f"{paths.key}.pub").read_text())
    auth.chmod(0o600)
    for path in (ssh_dir, auth):
        os.chown(path, uid, gid)


def known_hosts_lines(cfg: TestbedConfig, root: Path, address: str) -> list[str]:
    """known_hosts lines pinning the host keys in `root` for `address`."""
    host_keys = sorted((root / "etc" / "ssh").glob("ssh_host_*_key.pub"))
    entry = address if cfg.ssh_port == 22 else f"[{address}]:{cfg.ssh_port}"
    return [f"{entry} {' '.join(k.read_text().split()[:2])}\n" for k in host_keys]


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


def _start_nspawn(cfg: TestbedConfig, paths: Paths) -> int:
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
        spawn(cmd, cfg.name, paths.pid_file, log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pid = _read_pid(paths)
        if pid is not None:
            return pid
        time.sleep(0.05)
    raise LlamavmError(
        f"systemd-nspawn did not start; tail of {paths.nspawn_log}:\n{_tail(paths.nspawn_log)}"
    )


def _wait_for_ssh(cfg: TestbedConfig, paths: Paths, pid: int) -> None:
    """Wait until the admin user can log in over the LAN, or fail with the boot log's tail."""
    deadline = time.monotonic() + cfg.boot_timeout_s
    last = ""
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            raise LlamavmError(
                f"the test-bed container exited during boot; tail of {paths.nspawn_log}:\n"
                f"{_tail(paths.nspawn_log)}"
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
        f"(last error: {last}); tail of {paths.nspawn_log}:\n{_tail(paths.nspawn_log)}"
    )


def _stop_nspawn(cfg: TestbedConfig, paths: Paths) -> None:
    """Orderly poweroff (SIGTERM to nspawn = SIGRTMIN+3 to the container's init), then kill."""
    pid = _read_pid(paths)
    if pid is None:
        paths.pid_file.unlink(missing_ok=True)
        return
    inits = _children(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + cfg.stop_timeout_s
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.1)
    if _pid_alive(pid):
        print("llamavm testbed: container did not power off in time; killing it", flush=True)
        for child in [*inits, pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.1)
    paths.pid_file.unlink(missing_ok=True)


def _state_processes(cfg: TestbedConfig, paths: Paths) -> list[int]:
    """PIDs of processes that belong to the test bed: nspawn on our machine, and SSH
    multiplexers whose control sockets live in our state dir (Ansible's ControlPersist)."""
    needles = (str(paths.machine).encode(), str(paths.state / localinv.CONTROL_PATH_DIR).encode())
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if any(n in cmdline for n in needles) and _pid_alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def _netns_processes(ns_name: str) -> list[int]:
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


def _kill_stale(cfg: TestbedConfig, keep: int | None = None) -> list[int]:
    """SIGKILL what is left in the host's namespace of a container whose nspawn died.

    Killing systemd-nspawn alone (say, a session ended by SIGKILL) orphans the container's
    init and services, which keep its addresses and ports: a new container beside them would
    share the namespace with a ghost. `keep` spares the running nspawn's own processes.
    """
    spare = {keep, *(_children(keep) if keep else [])}
    stale = [pid for pid in _netns_processes(cfg.lan.ns_host) if pid not in spare]
    for pid in stale:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_pid_alive(pid) for pid in stale):
        time.sleep(0.05)
    return stale


def _state_mounts(cfg: TestbedConfig, paths: Paths) -> list[str]:
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
    cfg, paths = load_config(), Paths.from_env()
    found: dict[str, list[Any]] = dict(lan.leftovers(cfg.lan))
    found["processes"] = _state_processes(cfg, paths)
    found["mounts"] = _state_mounts(cfg, paths)
    return found


def up() -> TestbedInfo:
    """Bring the test bed up (building the rootfs if needed); idempotent. How to reach it."""
    require_root()
    ensure_host_tools()
    cfg, paths = load_config(), Paths.from_env()
    rootfs, built = ensure_rootfs(cfg, paths)
    ensure_keypair(paths)
    lan.up(cfg.lan)
    pid = _read_pid(paths)
    stamp = paths.machine / MACHINE_STAMP
    if pid is not None and stamp.exists() and stamp.read_text().strip() != cfg.rootfs_key:
        # The package list changed under a running test bed: boot the new machine.
        print(
            "llamavm testbed: the rootfs package set changed; stopping the running test bed",
            flush=True,
        )
        _stop_nspawn(cfg, paths)
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
        ensure_machine(cfg, paths, rootfs)
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
    require_root()
    cfg, paths = load_config(), Paths.from_env()
    _stop_nspawn(cfg, paths)
    _kill_stale(cfg)
    for pid in _state_processes(cfg, paths):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    # What else lives on the LAN goes with it: the embedded hypervisor (libvirtd inside the LAN
    # namespace) and its VMs. Left behind, they would keep a LAN nobody can reach; libvirt
    # finds its guests shut off when it starts again, and provisioning starts them.
    for pid in _netns_processes(cfg.lan.ns_lan):
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
    cfg, paths = load_config(), Paths.from_env()
    pid = _read_pid(paths)
    started = _process_start_time(pid) if pid else None
    return {
        "name": cfg.name,
        "state": "running" if pid else "stopped",
        "pid": pid,
        "init_pid": next(iter(_children(pid)), None) if pid else None,
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
        "rootfs_cached": (paths.rootfs(cfg.rootfs_key) / COMPLETE_STAMP).exists(),
        "models_dir": str(paths.models),
        "log": str(paths.nspawn_log),
    }


def ssh(argv: list[str]) -> int:
    """SSH to the host as the admin user (interactive when argv is empty); ssh's exit code."""
    cfg, paths = load_config(), Paths.from_env()
    return subprocess.run([*ssh_base_command(cfg, paths), *argv], check=False).returncode


def client_run(argv: list[str], **subprocess_kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """Run ARGV inside the LAN client's namespace (e.g. curl to the host's LAN address)."""
    cfg = load_config()
    if not lan.is_up(cfg.lan):
        raise LlamavmError("the test-bed LAN is down: run `python -m llamavm.testbed up` first")
    subprocess_kwargs.setdefault("check", False)
    return subprocess.run(["ip", "netns", "exec", cfg.lan.ns_client, *argv], **subprocess_kwargs)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamavm.testbed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="build (if needed) and boot the test bed; wait for SSH")
    p_down = sub.add_parser("down", help="stop the test bed and remove its LAN")
    p_down.add_argument("--purge", action="store_true", help="also delete the machine rootfs")
    sub.add_parser("status", help="print the test bed's status as JSON")
    p_ssh = sub.add_parser("ssh", help="ssh to the host as the admin user")
    p_ssh.add_argument("args", nargs=argparse.REMAINDER, help="remote command")
    p_client = sub.add_parser("client", help="run a command in the LAN client's namespace")
    p_client.add_argument("args", nargs=argparse.REMAINDER, help="command, e.g. curl URL")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            started = time.monotonic()
            info = up()
            print(json.dumps(info.to_dict(), indent=2))
            print(f"llamavm testbed: up in {time.monotonic() - started:.1f} s", file=sys.stderr)
        elif args.command == "down":
            down(purge=args.purge)
        elif args.command == "status":
            print(json.dumps(status(), indent=2))
        elif args.command == "ssh":
            return ssh(args.args)
        elif args.command == "client":
            command = args.args[1:] if args.args[:1] == ["--"] else args.args
            if not command:
                parser.error("client needs a command")
            return client_run(command).returncode
    except LlamavmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
