"""The VM builder's rendering step: for every VM of an inventory, the cloud-init seed and the
libvirt domain, each validated (against the guest's cloud-init and libvirt's schema) before it
is written. Nothing on a hypervisor is touched here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamavm import cloudinit, libvirt_domain, remote, vmspec
from llamavm import inventory as inventory_mod
from llamavm.vmspec import VmSpec

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
    hostvars = remote.inventory_data(inv.path).get("_meta", {}).get("hostvars", {})
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
