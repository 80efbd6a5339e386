"""Inventories: which one a task targets, and the llamavm settings its group_vars carry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llamavm import REPO_ROOT
from llamavm.errors import LlamavmError

#: The embedded default target: the local systemd test bed.
DEFAULT_INVENTORY = "local"
#: What a model host can be: a VM (libvirt, Proxmox), a WSL 2 distro, a container (the test bed),
#: native: the GPU box itself, its NVIDIA driver already installed (no VM, no passthrough), or
#: compose: a Docker Compose project on a box with a container engine
#: (llamavm/platforms/compose/).
PLATFORMS = ("vm", "wsl", "container", "native", "compose")
#: Platforms operators ask for that can't give a Linux model host the GPU, and the way that can.
NO_GPU_PATH = {
    "hyperv": "Hyper-V passes a GPU to a VM only by discrete device assignment, on Windows "
    "Server; Windows 10/11 have none for Linux guests — use llamavm_platform: wsl (WSL 2 uses "
    "the Windows driver), or a Linux hypervisor (llamavm_platform: vm)",
    "multipass": "Multipass has no GPU passthrough — use llamavm_platform: wsl on Windows, or a "
    "libvirt or Proxmox VE VM (llamavm_platform: vm) on Linux",
}


@dataclass(frozen=True)
class Inventory:
    path: Path
    catalog: str | None  # llamavm_catalog from group_vars, relative to the repo root
    platform: str
    #: llamavm_testbed: its hosts use the local test bed (its LAN, or as a llama.cpp builder).
    uses_testbed: bool = False
    #: llamavm_testbed_fleet: how many local fleet hosts (llamavm.testbed.fleet) it runs on.
    fleet: int = 0
    #: Every llamavm_* setting of its group_vars/all (later files win), and where each was read.
    settings: dict[str, Any] = field(default_factory=dict, compare=False)
    sources: dict[str, Path] = field(default_factory=dict, compare=False)

    @property
    def is_local(self) -> bool:
        return self.path.resolve() == (REPO_ROOT / "inventories" / DEFAULT_INVENTORY).resolve()


def resolve(name: str | None = None) -> Inventory:
    """An inventory by short name (a folder under inventories/) or by path."""
    name = name or DEFAULT_INVENTORY
    candidates = [Path(name), REPO_ROOT / "inventories" / name]
    found = next((c for c in candidates if c.exists()), None)
    # Absolute: ansible-inventory runs in ansible/, where a relative path would find nothing.
    path = found.absolute() if found is not None else None
    if path is None:
        known = ", ".join(
            sorted(p.name for p in (REPO_ROOT / "inventories").iterdir() if p.is_dir())
        )
        raise LlamavmError(f"inventory {name!r} not found — pass a path or one of: {known}")
    settings: dict[str, object] = {}
    sources: dict[str, Path] = {}
    group_vars = path / "group_vars" / "all" if path.is_dir() else None
    if group_vars and group_vars.is_dir():
        for file in sorted(group_vars.glob("*.yml")):
            try:
                data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise LlamavmError(f"{file}: invalid YAML ({exc}) — fix the syntax") from None
            if isinstance(data, dict):
                mine = {str(k): v for k, v in data.items() if str(k).startswith("llamavm_")}
                settings.update(mine)
                sources.update(dict.fromkeys(mine, file))
    catalog = settings.get("llamavm_catalog")
    if catalog is not None and not isinstance(catalog, str):
        raise LlamavmError(f"{path}: llamavm_catalog must be a path string, not {catalog!r}")
    if isinstance(catalog, str) and not Path(catalog).is_absolute():
        catalog = str(REPO_ROOT / catalog)
    platform = settings.get("llamavm_platform", "vm")
    if platform in NO_GPU_PATH:
        raise LlamavmError(
            f"{path}: llamavm_platform: {platform!r}: {NO_GPU_PATH[platform]}", code=2
        )
    if platform not in PLATFORMS:
        raise LlamavmError(
            f"{path}: llamavm_platform: {platform!r} is not a platform — use one of: "
            f"{', '.join(PLATFORMS)}",
            code=2,
        )
    fleet = settings.get("llamavm_testbed_fleet", 0)
    if isinstance(fleet, bool) or not isinstance(fleet, int) or not 0 <= fleet <= 8:
        raise LlamavmError(
            f"{path}: llamavm_testbed_fleet: {fleet!r} — the number of local fleet hosts, 0 to 8",
            code=2,
        )
    return Inventory(
        path=path,
        catalog=catalog,
        platform=str(platform),
        uses_testbed=settings.get("llamavm_testbed") is True or fleet > 0,
        fleet=fleet,
        settings=settings,
        sources=sources,
    )
