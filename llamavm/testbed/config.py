"""config/testbed.yaml, validated; where the test bed keeps its cache and state; the mirror."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from llamavm import REPO_ROOT
from llamavm import paths as controller_paths
from llamavm.errors import LlamavmError
from llamavm.testbed import lan, localinv

CONFIG_PATH = REPO_ROOT / "config" / "testbed.yaml"
#: Bump when the rootfs build or post-install steps change (llamavm/testbed/rootfs.py): it is
#: part of the cache key.
BUILD_SCRIPT_VERSION = 1


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
