"""WSL 2: a model host's distro as a rootfs tarball, its cloud-init user-data, and the Windows
side's PowerShell script — from the inventory's `llamavm_wsl` (config/wsl.schema.json).

The tarball is ready for `wsl --import` (or `wsl --install --from-file`): /etc/wsl.conf turns
systemd on and names the default user; the admin user has the inventory's keys and no password;
sshd listens on the host's `ansible_port` (key-only), with host keys made on first boot; a
keep-alive unit holds a Windows process open through WSL interop, so WSL's idle shutdown never
stops the model. After the import, `invoke provision` converges the distro over SSH like any
model host. The PowerShell script (generated from the inventory: the distro, its ports from
the catalog, the networking mode) copies the user-data to where WSL's cloud-init datasource
reads it, imports the distro, writes .wslconfig (mirrored networking on Windows 11, or netsh
port proxies), adds the Hyper-V or Windows firewall rule LAN clients need, and a logon task
that starts the distro.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jinja2

from llamavm import REPO_ROOT, proc
from llamavm import paths as controller_paths
from llamavm.artifacts import contract
from llamavm.errors import LlamavmError
from llamavm.inputs import catalog, validation
from llamavm.inputs import inventory as inventory_mod
from llamavm.ops import remote
from llamavm.platforms.vm import cloudinit, vmspec

SCHEMA_PATH = REPO_ROOT / "config" / "wsl.schema.json"
TEMPLATES = Path(__file__).parent / "wsl_templates"
SPEC_VAR = "llamavm_wsl"
#: Bump when what build() writes into the rootfs changes (part of the build key).
BUILD_VERSION = "1"
#: Ubuntu's WSL rootfs; pin the file you tested (llamavm_wsl.image_sha256).
UBUNTU_URL = (
    "https://cloud-images.ubuntu.com/wsl/releases/24.04/current/"
    "ubuntu-noble-wsl-amd64-24.04lts.rootfs.tar.gz"
)
KEEPALIVE_UNIT = "llamavm-wsl-keepalive.service"


class WslError(LlamavmError):
    exit_code = 2


@dataclass(frozen=True)
class Image:
    """What the user-data template asks of an image."""

    name: str
    source: str  # download | offline
    url: str | None
    sha256: str | None


@dataclass(frozen=True)
class WslSpec:
    host: str
    name: str
    image: Image
    admin_user: str
    ssh_keys: tuple[str, ...]
    ssh_port: int
    timezone: str
    locale: str
    networking: str
    processors: int | None
    memory_gib: int | None
    keepalive: bool
    install_dir: str | None
    ports: tuple[int, ...]  # what LAN clients reach: SSH, the models, the services

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@functools.cache
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def parse(label: str, host: str, data: Any, hostvars: dict[str, Any], ports: list[int]) -> WslSpec:
    """Validate one host's `llamavm_wsl` (label names the inventory and host)."""

    def fail(where: list[Any], problem: str, fix: str) -> WslError:
        path = SPEC_VAR + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in where)
        return WslError(f"{label}: {path}: {problem} — {fix}")

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise fail([], f"is {validation.describe(data)}, not a mapping", "write it as key: value")
    validation.refuse_control_characters(fail, data)
    validation.check(fail, schema(), data, "config/wsl.schema.json")
    raw = validation.with_defaults(data, schema())
    keys = vmspec.ssh_keys(fail, raw)
    image = raw["image"]
    if image == "ubuntu-24.04":
        if not raw["image_sha256"]:
            raise fail(
                ["image_sha256"], "the download of ubuntu-24.04 is not pinned",
                "set image_sha256 to the sha256sum of the rootfs tarball you tested",
            )  # fmt: skip
        spec_image = Image(image, "download", raw["image_url"] or UBUNTU_URL, raw["image_sha256"])
    else:
        spec_image = Image(image, "offline", None, None)
    port = hostvars.get("ansible_port") or 22
    if not isinstance(port, int) or not 0 < port < 65536:
        raise WslError(f"{label}: ansible_port: {port!r} is not a port — use e.g. 2222")
    return WslSpec(
        host=host,
        name=raw.get("name") or host.split(".")[0],
        image=spec_image,
        admin_user=str(hostvars.get("ansible_user") or raw["admin_user"]),
        ssh_keys=keys,
        ssh_port=port,
        timezone=raw["timezone"],
        locale=raw["locale"],
        networking=raw["networking"],
        processors=raw["processors"],
        memory_gib=raw["memory_gib"],
        keepalive=raw["keepalive"],
        install_dir=raw["install_dir"],
        ports=tuple(sorted({port, *ports})),
    )


def lan_ports(catalog_path: str | None) -> list[int]:
    """The ports LAN clients reach on a model host of this catalog: models and services."""
    cat = catalog.load(catalog.catalog_path(None, catalog_path))
    fw = contract.firewall(cat, contract.load_host_config())
    return sorted({*fw["model_ports"], *fw["service_ports"].values()})


def from_inventory(inventory: str | None = None, only: str | None = None) -> list[WslSpec]:
    """The WSL specs of an inventory's model hosts (those with llamavm_platform: wsl)."""
    inv = inventory_mod.resolve(inventory)
    found = remote.model_hosts(remote.inventory_data(inv.path), inv.path, only)
    ports = lan_ports(inv.catalog)
    specs = []
    for host, hv in found.items():
        if hv.get("llamavm_platform", inv.platform) != "wsl":
            continue
        specs.append(parse(f"{inv.path}: host {host}", host, hv.get(SPEC_VAR), hv, ports))
    if not specs:
        raise WslError(
            f"{inv.path}: no model host with llamavm_platform: wsl"
            + (f" named {only}" if only else "")
            + " — set it for the WSL hosts (group_vars or host_vars)"
        )
    return specs


# --- rendering ----------------------------------------------------------------------------------


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([TEMPLATES, cloudinit.TEMPLATES]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def cloud_init(image: Image) -> str:
    """The cloud-init version of the image (its schema validates the user-data), from
    config/images.yaml as for a VM: a WSL image is named like the VM image of its release.
    Ubuntu 24.04 has a WSL datasource (24.1+); Debian 12's 22.4 has none, so the offline image
    bakes everything in."""
    return vmspec.images()[image.name].cloud_init


def render(spec: WslSpec) -> dict[str, str]:
    """The files of a WSL build but the tarball: {name: text}."""
    env = _env()
    user_data = env.get_template("user-data.yaml.j2").render(spec=spec)
    cloudinit.validate_user_data(user_data, cloud_init(spec.image), f"WSL host {spec.host}")
    return {
        f"{spec.name}.user-data": user_data,
        f"install-{spec.name}.ps1": env.get_template("install.ps1.j2").render(
            spec=spec, tarball=tarball_name(spec)
        ),
    }


def rootfs_files(spec: WslSpec) -> dict[str, tuple[str, int]]:
    """What build() writes into the rootfs: {path: (text, mode)}."""
    env = _env()
    files = {
        "etc/wsl.conf": (env.get_template("wsl.conf.j2").render(spec=spec), 0o644),
        "etc/ssh/sshd_config.d/llamavm-wsl.conf": (
            env.get_template("sshd.conf.j2").render(spec=spec),
            0o644,
        ),
        "etc/systemd/system/llamavm-ssh-hostkeys.service": (
            env.get_template("llamavm-ssh-hostkeys.service.j2").render(spec=spec),
            0o644,
        ),
        f"etc/sudoers.d/{spec.admin_user}": (
            f"{spec.admin_user} ALL=(ALL:ALL) NOPASSWD: ALL\n",
            0o440,
        ),
        "etc/hostname": (f"{spec.name}\n", 0o644),
    }
    if spec.keepalive:
        files[f"etc/systemd/system/{KEEPALIVE_UNIT}"] = (
            env.get_template("llamavm-wsl-keepalive.service.j2").render(spec=spec),
            0o644,
        )
        files["usr/local/libexec/llamavm-wsl-keepalive"] = (
            env.get_template("llamavm-wsl-keepalive.j2").render(spec=spec),
            0o755,
        )
    return files


def tarball_name(spec: WslSpec) -> str:
    return f"{spec.name}.rootfs.tar.gz"


# --- building ---------------------------------------------------------------------------------


def _run(argv: list[str], what: str, **kwargs: Any) -> None:
    """proc.run, failing as a WslError that ends with the tool's stderr (its last 400 chars)."""
    proc.run(argv, what, error=WslError, stderr=subprocess.PIPE, tail=_stderr_tail, **kwargs)


def _stderr_tail(done: subprocess.CompletedProcess[str]) -> str:
    return done.stderr.strip()[-400:]


def _chroot(root: Path, *argv: str) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}
    _run(["chroot", str(root), *argv], f"chroot {argv[0]}", env=env)


def _base(spec: WslSpec, work: Path) -> tuple[Path, str]:
    """The base tree in `work`/root, and a key naming it."""
    root = work / "root"
    if spec.image.source == "offline":
        # The test bed's Debian 12 rootfs: every role's packages.
        from llamavm.testbed import config as testbed_config
        from llamavm.testbed import rootfs

        cfg, paths = testbed_config.load_config(), testbed_config.Paths.from_env()
        base, _ = rootfs.ensure(cfg, paths)
        _run(["cp", "-a", "--reflink=auto", str(base), str(root)], "copy the Debian 12 rootfs")
        (root / rootfs.COMPLETE_STAMP).unlink(missing_ok=True)
        # The test bed's password user exists to prove SSH refuses passwords: not here.
        if cfg.password_user != spec.admin_user:
            _chroot(root, "userdel", "--remove", cfg.password_user)
        return root, cfg.rootfs_key
    download = work / "base.tar.gz"
    _run(["curl", "-fsSL", "--retry", "3", "-o", str(download), str(spec.image.url)], "download")
    digest = hashlib.sha256(download.read_bytes()).hexdigest()
    if digest != spec.image.sha256:
        raise WslError(
            f"WSL host {spec.host}: {spec.image.url} has sha256 {digest}, the inventory pins "
            f"{spec.image.sha256} — check the download, then update llamavm_wsl.image_sha256"
        )
    root.mkdir()
    _run(["tar", "--numeric-owner", "-xpzf", str(download), "-C", str(root)], "unpack")
    return root, str(spec.image.sha256)[:16]


def customize(root: Path, spec: WslSpec) -> None:
    """Make a base tree the distro of `spec` (root-run, offline)."""
    passwd = (root / "etc" / "passwd").read_text()
    if not any(line.split(":")[0] == spec.admin_user for line in passwd.splitlines()):
        _chroot(root, "useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo",
                spec.admin_user)  # fmt: skip
    _chroot(root, "passwd", "--lock", spec.admin_user)
    for relative, (text, mode) in rootfs_files(spec).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    (root / "etc" / "hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{spec.name}\n::1\tlocalhost ip6-localhost\n"
    )
    home = root / "home" / spec.admin_user
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text("".join(f"{key}\n" for key in spec.ssh_keys))
    keys.chmod(0o600)
    from llamavm.testbed import rootfs

    uid, gid = rootfs.user_ids(root, spec.admin_user)
    for path in (home, ssh_dir, keys):
        os.chown(path, uid, gid)
    units = ["llamavm-ssh-hostkeys.service"]
    # A rootfs without sshd (some WSL images) gets it from the user-data's packages on its
    # first boot, and the package enables it then.
    if (root / "lib" / "systemd" / "system" / "ssh.service").exists() or (
        root / "usr" / "lib" / "systemd" / "system" / "ssh.service"
    ).exists():
        units.append("ssh.service")
    if spec.keepalive:
        units.append(KEEPALIVE_UNIT)
    _chroot(root, "systemctl", "enable", *units)
    # Per machine: host keys (made on first boot) and the machine id.
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc" / "machine-id").write_text("")


@dataclass(frozen=True)
class Built:
    spec: WslSpec
    tarball: Path
    files: dict[str, Path]
    rebuilt: bool


def build(spec: WslSpec, out: Path) -> Built:
    """The tarball, user-data and PowerShell script of `spec` in `out` (the tarball only when
    its key — base, spec, build version — changed)."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, text in render(spec).items():
        path = out / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written[name] = path
    tarball = out / tarball_name(spec)
    stamp = out / f"{spec.name}.build-key"
    with tempfile.TemporaryDirectory(prefix="llamavm-wsl-", dir=out) as tmp:
        work = Path(tmp)
        key_material = {"spec": spec.digest, "build": BUILD_VERSION}
        if spec.image.source == "offline":
            from llamavm.testbed import config as testbed_config

            key_material["base"] = testbed_config.load_config().rootfs_key
        else:
            key_material["base"] = str(spec.image.sha256)
        key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()
        if tarball.exists() and stamp.exists() and stamp.read_text().strip() == key:
            return Built(spec, tarball, written, False)
        root, _ = _base(spec, work)
        customize(root, spec)
        partial = out / f".{tarball.name}.part"
        _run(
            ["tar", "--numeric-owner", "--xattrs", "--acls", "-C", str(root), "-czf",
             str(partial), "."],
            "pack the rootfs",
        )  # fmt: skip
        os.replace(partial, tarball)
        stamp.write_text(key + "\n")
        shutil.rmtree(root, ignore_errors=True)
    return Built(spec, tarball, written, True)


def build_dir(inventory: inventory_mod.Inventory) -> Path:
    return controller_paths.wsl_builds(inventory.path.resolve().name)
