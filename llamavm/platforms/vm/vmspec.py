"""VM specs: one typed, validated spec per model host, from the inventory's `llamavm_vm`.

Where the VM runs, its size, image, firmware, bridged NIC (MAC, static address or DHCP), the
GPU's PCI functions, huge pages and CPU pinning. Every renderer (the cloud-init seed, the libvirt
domain; Proxmox and WSL later) starts from a VmSpec and derives nothing the spec does not say.
Problems are one line naming the inventory, the host and the key, and the fix (exit code 2).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llamavm import REPO_ROOT
from llamavm.errors import LlamavmError
from llamavm.inputs import inventory as inventory_mod
from llamavm.inputs import validation, yamlsafe
from llamavm.ops import remote

SCHEMA_PATH = REPO_ROOT / "config" / "vm.schema.json"
IMAGES_PATH = REPO_ROOT / "config" / "images.yaml"
SPEC_VAR = "llamavm_vm"


class VmSpecError(LlamavmError):
    """A VM spec (or the images file) is invalid; the message names where and the fix."""

    exit_code = 2


@dataclass(frozen=True)
class Image:
    name: str
    os: str
    source: str  # download | offline
    url: str | None
    sha256: str | None
    cloud_init: str


@dataclass(frozen=True)
class Network:
    bridge: str
    mac: str
    address: str  # "dhcp" or an IPv4 interface, e.g. 192.168.1.50/24
    gateway: str | None
    dns: tuple[str, ...]
    search: tuple[str, ...]

    @property
    def dhcp(self) -> bool:
        return self.address == "dhcp"

    @property
    def ip(self) -> str | None:
        """The static address without its prefix (None with DHCP)."""
        return None if self.dhcp else self.address.split("/")[0]


@dataclass(frozen=True)
class Gpu:
    pci: tuple[str, ...]
    mmio64_mib: int | None


@dataclass(frozen=True)
class ProxmoxVm:
    vmid: int
    pci_mapping: str | None  # a Proxmox PCI resource mapping (the API may then pass the GPU)


@dataclass(frozen=True)
class VmSpec:
    host: str  # the inventory host this VM is
    name: str  # the libvirt domain (and the guest's hostname)
    hypervisor: str
    vcpus: int
    memory_mib: int
    disk_gib: int
    image: Image
    firmware: str
    machine: str
    admin_user: str
    ssh_keys: tuple[str, ...]
    timezone: str
    locale: str
    network: Network
    gpu: Gpu | None
    hugepages: str | None  # page size: 2M or 1G
    cpu_pinning: tuple[int, ...] | None
    proxmox: ProxmoxVm | None = None  # where the hypervisor is Proxmox VE

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.proxmox is None:  # the digest of a libvirt VM's spec stays what it was
            del data["proxmox"]
        return data

    @property
    def digest(self) -> str:
        """Changes whenever anything in the spec changes."""
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def schema() -> dict[str, Any]:
    """config/vm.schema.json."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@functools.cache
def images_file(path: Path = IMAGES_PATH) -> Any:
    """config/images.yaml as written: the one reader of the file (images, the offline images'
    package sets, the cloud-init schemas' sources); `images()` checks its image entries."""
    try:
        return yamlsafe.load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VmSpecError(f"{path}: cannot read it ({exc}) — restore it from git") from None


@functools.cache
def images(path: Path = IMAGES_PATH) -> dict[str, Image]:
    """config/images.yaml."""

    def fail(where: str, problem: str) -> VmSpecError:
        return VmSpecError(f"{path}: {where}: {problem} — fix the file (see its header)")

    data = images_file(path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise fail("images", "missing or empty")
    found = {}
    for name, raw in entries.items():
        if not isinstance(raw, dict):
            raise fail(f"images.{name}", "is not a mapping")
        source, version = raw.get("source"), raw.get("cloud_init")
        if source not in ("download", "offline"):
            raise fail(f"images.{name}.source", f"{source!r} is not download or offline")
        if not isinstance(version, str) or version not in (data.get("cloud_init_schemas") or {}):
            raise fail(f"images.{name}.cloud_init", f"{version!r} has no cloud_init_schemas entry")
        found[str(name)] = Image(
            name=str(name),
            os=str(raw.get("os", "")),
            source=source,
            url=raw.get("url"),
            sha256=raw.get("sha256"),
            cloud_init=version,
        )
    return found


class _Checker:
    def __init__(self, label: str) -> None:
        self.label = label

    def where(self, parts: list[Any]) -> str:
        out = SPEC_VAR
        for part in parts:
            out += f"[{part}]" if isinstance(part, int) else f".{part}"
        return out

    def fail(self, where: list[Any], problem: str, fix: str) -> VmSpecError:
        return VmSpecError(f"{self.label}: {self.where(where)}: {problem} — {fix}")


def ssh_keys(fail: validation.Fail, raw: dict[str, Any]) -> tuple[str, ...]:
    """The admin user's keys: ssh_authorized_keys and the key in ssh_public_key_file (read on
    this controller and checked like the others). Shared by the VM and WSL specs."""
    keys = list(raw["ssh_authorized_keys"])
    path = raw["ssh_public_key_file"]
    if path:
        file = Path(os.path.expanduser(path))
        try:
            text = file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise fail(
                ["ssh_public_key_file"],
                f"cannot read {file} ({exc.strerror})",
                "point at an existing .pub file on this controller",
            ) from None
        item = schema()["properties"]["ssh_authorized_keys"]["items"]
        validation.check(fail, item, text, "config/vm.schema.json")
        keys.append(text)
    if not keys:
        raise fail(
            ["ssh_authorized_keys"],
            "no SSH key for the admin user (password logins are off, so nobody could log in)",
            "set ssh_authorized_keys or ssh_public_key_file",
        )
    return tuple(dict.fromkeys(keys))


def _network(check: _Checker, raw: dict[str, Any]) -> Network:
    net = validation.with_defaults(raw, schema()["properties"]["network"])
    mac = net["mac"]
    first = int(mac.split(":")[0], 16)
    if first & 1 or not first & 2:
        raise check.fail(
            ["network", "mac"],
            f"{mac} is not a locally administered unicast address",
            "use one starting 52:54:00 (libvirt's range), and keep it: it is the VM's identity",
        )
    gateway = net["gateway"]
    if net["address"] != "dhcp":
        try:
            iface = ipaddress.IPv4Interface(net["address"])
        except ValueError as exc:
            raise check.fail(
                ["network", "address"], f"{net['address']!r}: {exc}", "use e.g. 192.168.1.50/24"
            ) from None
        if iface.network.prefixlen < 31 and iface.ip in (
            iface.network.network_address,
            iface.network.broadcast_address,
        ):
            raise check.fail(
                ["network", "address"],
                f"{iface.ip} is the network or broadcast address of {iface.network}",
                "pick a host address inside the subnet",
            )
        if gateway and ipaddress.IPv4Address(gateway) not in iface.network:
            raise check.fail(
                ["network", "gateway"],
                f"{gateway} is outside {iface.network}",
                "use the router of the VM's own subnet",
            )
    elif gateway:
        raise check.fail(
            ["network", "gateway"], "a gateway with DHCP", "remove it: DHCP gives the gateway"
        )
    return Network(
        bridge=net["bridge"],
        mac=mac,
        address=net["address"],
        gateway=gateway,
        dns=tuple(net["dns"]),
        search=tuple(net["search"]),
    )


def _image(check: _Checker, raw: dict[str, Any], known: dict[str, Image]) -> Image:
    image = known.get(raw["image"])
    if image is None:
        raise check.fail(
            ["image"],
            f"{raw['image']!r} is not an image of config/images.yaml",
            f"use one of: {', '.join(sorted(known))}",
        )
    if image.source == "download":
        url = raw["image_url"] or image.url
        sha = raw["image_sha256"] or image.sha256
        if not url:
            raise check.fail(["image_url"], "is missing", "give the image's download URL")
        if not sha:
            raise check.fail(
                ["image_sha256"],
                f"the download of {image.name} is not pinned",
                "set image_sha256 to the sha256sum of the image you tested",
            )
        return Image(image.name, image.os, image.source, url, sha, image.cloud_init)
    return image


def parse(label: str, host: str, data: Any, known: dict[str, Image] | None = None) -> VmSpec:
    """Validate one host's `llamavm_vm` (label names inventory and host in messages)."""
    check = _Checker(label)
    if not isinstance(data, dict):
        raise check.fail(
            [], f"is {validation.describe(data)}, not a mapping", "write it as key: value"
        )
    validation.refuse_control_characters(check.fail, data)
    validation.check(check.fail, schema(), data, "config/vm.schema.json")
    raw = validation.with_defaults(data, schema())
    name = raw.get("name") or host.split(".")[0].lower()
    if "name" not in raw:
        validation.check(check.fail, schema()["properties"]["name"], name, "config/vm.schema.json")
    gpu = None
    if raw["gpu"]:
        gpu_raw = validation.with_defaults(raw["gpu"], schema()["properties"]["gpu"])
        pci = tuple(gpu_raw["pci"])
        if len(set(pci)) != len(pci):
            raise check.fail(["gpu", "pci"], "lists a function twice", "list each one once")
        if raw["machine"] != "q35" or raw["firmware"] != "efi":
            raise check.fail(
                ["machine"],
                f"GPU passthrough with machine {raw['machine']} and firmware {raw['firmware']}",
                "use machine: q35 and firmware: efi for a passed-through GPU",
            )
        gpu = Gpu(pci=pci, mmio64_mib=gpu_raw["mmio64_mib"])
    hugepages = raw["hugepages"]["size"] if raw["hugepages"] else None
    if hugepages == "1G" and raw["memory_mib"] % 1024:
        raise check.fail(
            ["memory_mib"],
            f"{raw['memory_mib']} MiB is not a whole number of 1G huge pages",
            "use a multiple of 1024",
        )
    if hugepages == "2M" and raw["memory_mib"] % 2:
        raise check.fail(
            ["memory_mib"], "is odd: not a whole number of 2M pages", "use an even size"
        )
    pinning = raw["cpu_pinning"]
    if pinning is not None:
        if len(pinning) != raw["vcpus"] or len(set(pinning)) != len(pinning):
            raise check.fail(
                ["cpu_pinning"],
                f"{len(pinning)} entries ({len(set(pinning))} different) for {raw['vcpus']} vCPUs",
                "list exactly one different host CPU per vCPU",
            )
        pinning = tuple(pinning)
    return VmSpec(
        host=host,
        name=name,
        hypervisor=raw["hypervisor"],
        vcpus=raw["vcpus"],
        memory_mib=raw["memory_mib"],
        disk_gib=raw["disk_gib"],
        image=_image(check, raw, known if known is not None else images()),
        firmware=raw["firmware"],
        machine=raw["machine"],
        admin_user=raw["admin_user"],
        ssh_keys=ssh_keys(check.fail, raw),
        timezone=raw["timezone"],
        locale=raw["locale"],
        network=_network(check, raw["network"]),
        gpu=gpu,
        hugepages=hugepages,
        cpu_pinning=pinning,
        proxmox=(
            ProxmoxVm(vmid=raw["proxmox"]["vmid"], pci_mapping=raw["proxmox"].get("pci_mapping"))
            if raw["proxmox"]
            else None
        ),
    )


#: The group of hosts that export the model share; they may be VMs of the inventory too.
NFS_GROUP = "nfs_servers"


def from_inventory(inventory: str | None = None, only: str | None = None) -> list[VmSpec]:
    """Every VM spec of an inventory's model hosts and NFS servers (hosts without llamavm_vm
    are not VMs)."""
    inv = inventory_mod.resolve(inventory)
    data = remote.inventory_data_cached(inv.path)
    found = remote.model_hosts(data, inv.path, also=(NFS_GROUP,))
    if only:
        if only not in found:
            raise VmSpecError(f"{inv.path}: no host {only!r} — hosts: {', '.join(found)}")
        found = {only: found[only]}
    specs = []
    for host, hv in found.items():
        if SPEC_VAR not in hv:
            continue
        platform = hv.get("llamavm_platform", inv.platform)
        label = f"{inv.path}: host {host}"
        if platform != "vm":
            raise VmSpecError(
                f"{label}: llamavm_platform: {platform!r} has no VM spec — set it to vm, or "
                f"remove {SPEC_VAR} from the host"
            )
        specs.append(parse(label, host, hv[SPEC_VAR]))
    _unique(inv.path, specs)
    return specs


def _unique(inventory: Path, specs: list[VmSpec]) -> None:
    for attr, what in (("name", "VM name"), ("mac", "MAC"), ("ip", "address")):
        seen: dict[str, str] = {}
        for spec in specs:
            value = getattr(spec.network if attr in ("mac", "ip") else spec, attr)
            if value is None:
                continue
            if value in seen:
                raise VmSpecError(
                    f"{inventory}: host {spec.host}: {SPEC_VAR}: {what} {value} is also "
                    f"host {seen[value]}'s — give every VM its own"
                )
            seen[value] = spec.host
