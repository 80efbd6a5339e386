"""The VM builder's rendering step: for every VM of an inventory, the cloud-init seed and the
libvirt domain, each validated (against the guest's cloud-init and libvirt's schema) before it
is written. Nothing on a hypervisor is touched here."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamavm import paths
from llamavm.inputs import inventory as inventory_mod
from llamavm.ops import remote
from llamavm.platforms import proxmox
from llamavm.platforms.vm import cloudinit, libvirt_domain, vmimage, vmspec
from llamavm.platforms.vm.vmspec import VmSpec

#: Hypervisor host variables (inventory) and their defaults.
IMAGES_DIR_VAR = "llamavm_hypervisor_images_dir"
VIRT_TYPE_VAR = "llamavm_hypervisor_virt_type"


@dataclass(frozen=True)
class Rendered:
    spec: VmSpec
    seed: cloudinit.Seed
    domain_xml: str
    placement: libvirt_domain.Placement
    changed: list[str]


def placement(spec: VmSpec, hypervisor_vars: dict[str, Any]) -> libvirt_domain.Placement:
    """Where the hypervisor keeps this VM's files and how it runs it."""
    images_dir = str(hypervisor_vars.get(IMAGES_DIR_VAR, "/var/lib/libvirt/images"))
    virt_type = str(hypervisor_vars.get(VIRT_TYPE_VAR, "kvm"))
    if spec.image.source == "offline":  # built without a boot loader: direct kernel boot
        base = f"{images_dir}/llamavm-{spec.image.name}"
        return libvirt_domain.Placement(
            images_dir=images_dir,
            virt_type=virt_type,
            kernel=f"{base}.vmlinuz",
            initrd=f"{base}.initrd.img",
            cmdline="root=/dev/vda rw console=ttyS0",
        )
    return libvirt_domain.Placement(images_dir=images_dir, virt_type=virt_type)


def render_all(inventory: str | None, out: Path | None = None) -> list[Rendered]:
    """Validate and render every VM of `inventory`; write them under `out` when given."""
    inv = inventory_mod.resolve(inventory)
    specs = vmspec.from_inventory(inventory)
    hostvars = remote.inventory_data_cached(inv.path).get("_meta", {}).get("hostvars", {})
    results = []
    for spec in specs:
        label = f"{inv.path}: host {spec.host}"
        seed = cloudinit.render(spec)
        cloudinit.validate(seed, spec.image.cloud_init, label)
        where = placement(spec, hostvars.get(spec.hypervisor, {}))
        xml = libvirt_domain.render(spec, where)
        libvirt_domain.validate(xml, label)
        changed = []
        if out is not None:
            folder = out / spec.name
            if cloudinit.write_seed(seed, folder / "seed.iso"):
                changed.append("seed.iso")
            for name, text in seed.files().items():
                if libvirt_domain.write(text, folder / "seed" / name):
                    changed.append(f"seed/{name}")
            if libvirt_domain.write(xml, folder / "domain.xml"):
                changed.append("domain.xml")
            spec_json = json.dumps(spec.as_dict(), indent=2, sort_keys=True) + "\n"
            if libvirt_domain.write(spec_json, folder / "spec.json"):
                changed.append("spec.json")
        results.append(Rendered(spec, seed, xml, where, changed))
    return results


def render_dir(inventory: inventory_mod.Inventory) -> Path:
    """Where the controller keeps the rendered seeds and domains of an inventory's VMs."""
    return paths.vm_renders(inventory.path.resolve().name)


def base_disk(item: Rendered) -> str:
    """The base image's path on the hypervisor (the VM disk's backing file)."""
    image = item.spec.image
    if image.source == "offline":
        # Keyed by the image's content: a new package list is a new file, never an overwrite
        # of the backing file under existing VM disks.
        key = vmimage.key_of(image.name)
        return f"{item.placement.images_dir}/llamavm-{image.name}-{key}.qcow2"
    return f"{item.placement.images_dir}/{image.name}-{(image.sha256 or '')[:12]}.img"


def prepare(inventory: str | None, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Render the VMs of `inventory` and build their offline images: `llamavm_vms` for the
    vm.yml playbook ([] when the inventory has no VMs). Starts this machine's own hypervisor
    when a VM runs on localhost."""
    inv = inventory_mod.resolve(inventory)
    data = remote.inventory_data_cached(inv.path)
    hypervisors = remote.group_hosts(data, "llamavm_hypervisors")
    if "localhost" in hypervisors:
        from llamavm.testbed import localhv

        localhv.up()
        localhv.ensure_keys(data.get("_meta", {}).get("hostvars", {}), say)
    out = render_dir(inv)
    rendered = render_all(inventory, out)
    hostvars = data.get("_meta", {}).get("hostvars", {})
    vms = []
    for item in rendered:
        spec, where = item.spec, item.placement
        kind = "libvirt"
        if proxmox.is_proxmox(hostvars.get(spec.hypervisor, {})):
            proxmox.validate(str(inv.path), spec, hostvars[spec.hypervisor])
            kind = "proxmox"
        entry: dict[str, Any] = {
            "kind": kind,
            "name": spec.name,
            "host": spec.host,
            "hypervisor": spec.hypervisor,
            "disk_gib": spec.disk_gib,
            "image": {
                "name": spec.image.name,
                "source": spec.image.source,
                "url": spec.image.url,
                "sha256": spec.image.sha256,
            },
            "base_disk": base_disk(item),
            "disk": where.disk(spec),
            "seed": where.seed(spec),
            "seed_src": str(out / spec.name / "seed.iso"),
            "domain_src": str(out / spec.name / "domain.xml"),
            "offline_files": [],
            "gpu": (
                {"pci": list(spec.gpu.pci), "mmio64_mib": spec.gpu.mmio64_mib} if spec.gpu else None
            ),
        }
        if spec.image.source == "offline" and kind == "libvirt":
            image = vmimage.ensure_offline(spec.image.name)
            entry["offline_files"] = [
                {"src": str(image.disk), "dest": entry["base_disk"]},
                {"src": str(image.kernel), "dest": where.kernel},
                {"src": str(image.initrd), "dest": where.initrd},
            ]
        say(f"llamavm: VM {spec.name} ({spec.host}) on {spec.hypervisor}: seed and domain valid")
        vms.append(entry)
    return vms
