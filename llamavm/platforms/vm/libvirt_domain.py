"""The libvirt rendering of a VM spec: a domain XML, built with ElementTree (every value
escaped by construction) and validated against libvirt's own RelaxNG schema.

The same spec always gives the same XML (a UUID derived from hypervisor and name, no
timestamps), so defining it again changes nothing; a changed spec gives a changed XML.
"""

from __future__ import annotations

import subprocess
import tempfile
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from llamavm.errors import LlamavmError
from llamavm.platforms.vm.vmspec import VmSpec

#: Namespace of llamavm's own metadata inside the domain (what spec it came from).
XMLNS = "https://llamavm.invalid/xmlns/vm/1"
QEMU_XMLNS = "http://libvirt.org/schemas/domain/qemu/1.0"
_UUID_NAMESPACE = uuid.UUID("4d6f7a1e-7f0c-4b1e-9a57-6c6c616d6176")


class DomainError(LlamavmError):
    exit_code = 2


@dataclass(frozen=True)
class Placement:
    """Where the hypervisor keeps a VM's files, and how it runs guests."""

    images_dir: str = "/var/lib/libvirt/images"
    #: kvm where hardware virtualisation works; qemu (TCG) where it doesn't (this machine).
    virt_type: str = "kvm"
    #: Direct kernel boot (offline images have no boot loader): kernel, initrd, command line.
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None

    def disk(self, spec: VmSpec) -> str:
        return f"{self.images_dir}/{spec.name}.qcow2"

    def seed(self, spec: VmSpec) -> str:
        return f"{self.images_dir}/{spec.name}-seed.iso"


def domain_uuid(spec: VmSpec) -> str:
    return str(uuid.uuid5(_UUID_NAMESPACE, f"{spec.hypervisor}/{spec.name}"))


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        element.text = text
    return element


def _pci(address: str) -> dict[str, str]:
    domain, bus, rest = address.split(":")
    slot, function = rest.split(".")
    return {
        "domain": f"0x{domain}",
        "bus": f"0x{bus}",
        "slot": f"0x{slot}",
        "function": f"0x{function}",
    }


def render(spec: VmSpec, placement: Placement) -> str:
    """The domain XML of `spec` on its hypervisor."""
    if placement.virt_type not in ("kvm", "qemu"):
        raise DomainError(f"virt_type {placement.virt_type!r}: use kvm, or qemu (TCG)")
    ET.register_namespace("llamavm", XMLNS)
    ET.register_namespace("qemu", QEMU_XMLNS)
    root = ET.Element("domain", {"type": placement.virt_type})
    _sub(root, "name", spec.name)
    _sub(root, "uuid", domain_uuid(spec))
    _sub(root, "title", f"llamavm model host {spec.host}")
    meta = ET.SubElement(_sub(root, "metadata"), f"{{{XMLNS}}}vm")
    ET.SubElement(meta, f"{{{XMLNS}}}host").text = spec.host
    ET.SubElement(meta, f"{{{XMLNS}}}spec").text = spec.digest
    _sub(root, "memory", str(spec.memory_mib), unit="MiB")
    _sub(root, "currentMemory", str(spec.memory_mib), unit="MiB")
    if spec.hugepages:
        backing = _sub(root, "memoryBacking")
        size, unit = ("1", "GiB") if spec.hugepages == "1G" else ("2", "MiB")
        _sub(_sub(backing, "hugepages"), "page", size=size, unit=unit)
    _sub(root, "vcpu", str(spec.vcpus), placement="static")
    if spec.cpu_pinning:
        tune = _sub(root, "cputune")
        for vcpu, cpu in enumerate(spec.cpu_pinning):
            _sub(tune, "vcpupin", vcpu=str(vcpu), cpuset=str(cpu))
    os_attrs = {"firmware": "efi"} if spec.firmware == "efi" else {}
    os_el = _sub(root, "os", **os_attrs)
    _sub(os_el, "type", "hvm", arch="x86_64", machine=spec.machine)
    if placement.kernel:
        _sub(os_el, "kernel", placement.kernel)
        if placement.initrd:
            _sub(os_el, "initrd", placement.initrd)
        _sub(os_el, "cmdline", placement.cmdline or "root=/dev/vda rw console=ttyS0")
    else:
        _sub(os_el, "boot", dev="hd")
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    # TCG has no host CPU to pass through: the most capable emulated one.
    _sub(root, "cpu", mode="host-passthrough" if placement.virt_type == "kvm" else "maximum")
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", discard="unmap")
    _sub(disk, "source", file=placement.disk(spec))
    _sub(disk, "target", dev="vda", bus="virtio")
    seed = _sub(devices, "disk", type="file", device="disk")
    _sub(seed, "driver", name="qemu", type="raw")
    _sub(seed, "source", file=placement.seed(spec))
    _sub(seed, "target", dev="vdb", bus="virtio")
    _sub(seed, "readonly")
    nic = _sub(devices, "interface", type="bridge")
    _sub(nic, "mac", address=spec.network.mac)
    _sub(nic, "source", bridge=spec.network.bridge)
    _sub(nic, "model", type="virtio")
    _sub(_sub(devices, "serial", type="pty"), "target", port="0")
    _sub(_sub(devices, "console", type="pty"), "target", type="serial", port="0")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    if spec.gpu:
        for address in spec.gpu.pci:
            hostdev = _sub(devices, "hostdev", mode="subsystem", type="pci", managed="yes")
            _sub(_sub(hostdev, "source"), "address", **_pci(address))
        if spec.gpu.mmio64_mib:
            # OVMF's 64-bit PCI MMIO window must hold the card's BARs (32 GB of VRAM and up).
            cmd = ET.SubElement(root, f"{{{QEMU_XMLNS}}}commandline")
            ET.SubElement(cmd, f"{{{QEMU_XMLNS}}}arg", {"value": "-fw_cfg"})
            value = f"name=opt/ovmf/X-PciMmio64Mb,string={spec.gpu.mmio64_mib}"
            ET.SubElement(cmd, f"{{{QEMU_XMLNS}}}arg", {"value": value})
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def validate(xml: str, label: str) -> None:
    """Raise DomainError unless libvirt's schema (virt-xml-validate) accepts `xml`."""
    with tempfile.NamedTemporaryFile("w", suffix=".xml") as handle:
        handle.write(xml)
        handle.flush()
        try:
            run = subprocess.run(
                ["virt-xml-validate", handle.name, "domain"],
                capture_output=True,
                text=True,
                check=False,
            )
        except FileNotFoundError:
            raise DomainError(
                "virt-xml-validate not found — install libvirt-clients (scripts/bootstrap does)"
            ) from None
    if run.returncode != 0:
        detail = " ".join((run.stderr or run.stdout).split())[:300]
        raise DomainError(f"{label}: the domain XML fails libvirt's schema: {detail}")


def write(xml: str, path: Path) -> bool:
    """Write `xml` at `path` unless it is already there; True when it changed."""
    if path.is_file() and path.read_text() == xml:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(xml)
    return True
