"""The controller's own folders, owned here and nowhere else.

Two roots, each its environment variable when that is set and not empty, else its default:
- the cache, ``$LLAMAVM_CACHE`` or /var/cache/llamavm: what llamavm can make again (the
  llama.cpp source, images, root filesystems, the stand-in models, estimates, parsed inventories);
- the state, ``$LLAMAVM_STATE`` or /var/lib/llamavm: what it must keep (API keys, the test bed's
  machines and SSH keys, the records of converged hosts, rendered Compose projects).

Every named folder under them is a function below, read when called (so a test or a bench that
sets the variables gets its own folders). The hosts' paths are not these: they are the contract's
(config/host.yaml).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LLAMAVM_CACHE"
STATE_ENV = "LLAMAVM_STATE"
DEFAULT_CACHE = Path("/var/cache/llamavm")
DEFAULT_STATE = Path("/var/lib/llamavm")


def _root(env: str, default: Path) -> Path:
    return Path(os.environ.get(env) or default)


def cache() -> Path:
    """The cache root."""
    return _root(CACHE_ENV, DEFAULT_CACHE)


def state() -> Path:
    """The state root."""
    return _root(STATE_ENV, DEFAULT_STATE)


# --------------------------------------------------------------------------- under the cache


def gguf_headers() -> Path:
    """Parsed GGUF headers, by file identity (the VRAM estimate's input)."""
    return cache() / "gguf"


def checked_catalogs() -> Path:
    """Markers of catalog texts that passed the schema."""
    return cache() / "catalogs"


def inventories() -> Path:
    """Parsed static inventories, by content."""
    return cache() / "inventory"


def file_digests() -> Path:
    """The digests of the files a provision ships (converge's no-op check)."""
    return cache() / "digests.json"


def cloud_init_schemas() -> Path:
    """cloud-init's JSON schema, per cloud-init version."""
    return cache() / "cloud-init-schemas"


def host_packages() -> Path:
    """The on-host package's zipapps, by source."""
    return cache() / "host"


def vm_images() -> Path:
    """Offline VM images, by package list."""
    return cache() / "vm-images"


def vm_renders(inventory: str) -> Path:
    """The rendered seeds and domains of an inventory's VMs."""
    return cache() / "vm" / inventory


def wsl_builds(inventory: str) -> Path:
    """The WSL bundles of an inventory."""
    return cache() / "wsl" / inventory


def rootfs() -> Path:
    """Debian root filesystems (the test bed's, the images' bases), by key."""
    return cache() / "rootfs"


def models() -> Path:
    """The tiny stand-in models: the embedded targets' model share."""
    return cache() / "models"


def artifacts() -> Path:
    """llama.cpp builds, compiled once on a builder and installed on many hosts."""
    return cache() / "artifacts"


def canary() -> Path:
    """The canary model a llama.cpp build must answer from."""
    return cache() / "canary"


# --------------------------------------------------------------------------- under the state


def keys() -> Path:
    """The hosts' API keys (0600 files, their folder 0700)."""
    return state() / "keys"


def converged() -> Path:
    """What each host was last converged with."""
    return state() / "converge"


def compose_projects() -> Path:
    """Rendered Compose projects, per inventory."""
    return state() / "compose"


def testbed() -> Path:
    """The embedded default target: machine, SSH key, pinned host keys, logs."""
    return state() / "testbed"


def fleet() -> Path:
    """The fleet bed's machines."""
    return state() / "fleet"


def local_vms() -> Path:
    """The embedded VMs: their SSH key, pinned host keys and disk images."""
    return state() / "vm"
