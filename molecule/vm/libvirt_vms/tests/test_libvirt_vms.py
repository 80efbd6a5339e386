"""testinfra checks of the libvirt_vms role on the embedded hypervisor: every VM of the lab is
defined as rendered, runs, starts with its hypervisor, and sits on its own disk over the keyed
base image, with its cloud-init seed."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

#: Where `invoke provision` rendered the lab's domains and seeds
#: (llamavm.platforms.vm.vmbuild.render_dir: the controller's cache, $LLAMAVM_CACHE or
#: /var/cache/llamavm; the hypervisor is the controller).
RENDER = f"{os.environ.get('LLAMAVM_CACHE') or '/var/cache/llamavm'}/vm/local-vm"
VMS = ["llamavm-vm", "llamavm-nas"]


UNITS_KIB = {"KiB": 1, "k": 1, "MiB": 1024, "M": 1024, "GiB": 1024**2, "G": 1024**2}


def _kib(element: ET.Element) -> int:
    """A <memory> value in KiB (libvirt keeps KiB; the rendered XML says MiB)."""
    return int(element.text) * UNITS_KIB[element.get("unit", "KiB")]


def _live(host, name: str) -> ET.Element:
    return ET.fromstring(host.check_output(f"virsh -c qemu:///system dumpxml --inactive {name}"))


@pytest.mark.parametrize("name", VMS)
def test_the_vm_runs_and_starts_with_its_hypervisor(host, name) -> None:
    info = host.check_output(f"virsh -c qemu:///system dominfo {name}")
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    assert fields["State"].strip() == "running"
    assert fields["Autostart"].strip() == "enable"


@pytest.mark.parametrize("name", VMS)
def test_the_definition_is_the_rendered_one(host, name) -> None:
    rendered = ET.fromstring(host.file(f"{RENDER}/{name}/domain.xml").content_string)
    live = _live(host, name)
    assert live.get("type") == "qemu"  # TCG here (TESTBED.md): never kvm
    for path in ("name", "uuid", "vcpu", "os/kernel", "os/cmdline"):
        assert live.findtext(path) == rendered.findtext(path), path
    assert _kib(live.find("memory")) == _kib(rendered.find("memory"))
    nic, want = live.find("devices/interface"), rendered.find("devices/interface")
    assert nic.find("mac").get("address") == want.find("mac").get("address")
    assert nic.find("source").get("bridge") == want.find("source").get("bridge")


@pytest.mark.parametrize("name", VMS)
def test_the_disk_is_its_own_over_the_keyed_base_image_with_the_seed(host, name) -> None:
    live = _live(host, name)
    disks = {d.find("target").get("dev"): d.find("source").get("file")
             for d in live.findall("devices/disk")}  # fmt: skip
    disk = next(path for dev, path in disks.items() if dev.startswith("vd"))
    info = json.loads(host.check_output(f"qemu-img info --force-share --output=json {disk}"))
    assert info["format"] == "qcow2"
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    assert backing and Path(backing).name.startswith("llamavm-") and backing != disk
    assert host.file(backing).exists
    seeds = [path for path in disks.values() if path and path.endswith(".iso")]
    assert seeds and host.file(seeds[0]).exists
