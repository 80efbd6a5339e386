"""The test bed's Debian root filesystem: debootstrap of config/testbed.yaml's package set,
made a bootable, SSH-reachable host, cached under ${LLAMAVM_CACHE}/rootfs/<key>/ (the key:
config.TestbedConfig.rootfs_key). The test-bed machine, each fleet host and the WSL bundle are
copies of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from llamavm import proc
from llamavm.errors import LlamavmError
from llamavm.platforms import debian
from llamavm.testbed import config

#: The file that marks a finished build (a copy of the rootfs drops it).
COMPLETE_STAMP = ".llamavm-rootfs"


def user_ids(root: Path, user: str) -> tuple[int, int]:
    """The uid and gid of `user` in the tree `root` (its /etc/passwd)."""
    for line in (root / "etc" / "passwd").read_text().splitlines():
        parts = line.split(":")
        if parts[0] == user:
            return int(parts[2]), int(parts[3])
    raise LlamavmError(f"user {user!r} is missing from the rootfs {root}")


def _chroot(root: Path, *cmd: str, log: Path) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}
    proc.run(["chroot", str(root), *cmd], log=log, what=f"chroot {cmd[0]}", env=env)


def _post_install(cfg: config.TestbedConfig, root: Path, log: Path) -> None:
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
    _chroot(root, "systemctl", "enable", "ssh.service", "systemd-networkd.service", log=log)
    # Nothing on the LAN routes to a network: don't wait for "online" at boot.
    _chroot(root, "systemctl", "mask", "systemd-networkd-wait-online.service", log=log)
    # Host keys and machine-id are per machine (made when the machine copy is made); the
    # C.UTF-8 locale; no downloaded .debs.
    debian.generalize(root)


def cached(cfg: config.TestbedConfig | None = None, paths: config.Paths | None = None) -> bool:
    """Whether the rootfs of this package set is built already (up() will not debootstrap)."""
    cfg, paths = cfg or config.load_config(), paths or config.Paths.from_env()
    return (paths.rootfs(cfg.rootfs_key) / COMPLETE_STAMP).exists()


def ensure(cfg: config.TestbedConfig, paths: config.Paths) -> tuple[Path, bool]:
    """The cached rootfs for cfg.rootfs_key, built (atomically) if missing. (path, built?)."""
    final = paths.rootfs(cfg.rootfs_key)
    if cached(cfg, paths):
        return final, False
    paths.rootfs_root.mkdir(parents=True, exist_ok=True)
    tmp = paths.rootfs_root / f".build-{cfg.rootfs_key}-{os.getpid()}"
    for stale in (tmp, final):
        if stale.exists():
            shutil.rmtree(stale)
    log = paths.logs / "rootfs-build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    mirror = config.resolve_mirror(cfg)
    print(
        f"llamavm testbed: building rootfs {cfg.rootfs_key} ({cfg.suite}, {len(cfg.packages)} "
        f"packages, mirror {mirror}); log: {log}",
        flush=True,
    )
    try:
        proc.run(
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
