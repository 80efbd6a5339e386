"""Rendering VM specs: cloud-init seeds valid for the guest's own cloud-init version, libvirt
domains valid for libvirt's schema, both byte-for-byte stable."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

import pytest
import yaml

from llamavm.inputs.inventory import DEFAULT_INVENTORY
from llamavm.platforms.vm import cloudinit, libvirt_domain, vmbuild, vmspec


def _specs() -> list[tuple[str, vmspec.VmSpec]]:
    """The example inventory's VMs, and an offline Debian 12 VM on TCG as on this machine."""
    specs = [("example-lab", s) for s in vmspec.from_inventory("example-lab")]
    offline = vmspec.parse(
        "local",
        "llamavm-vm",
        {
            "hypervisor": "localhost",
            "vcpus": 2,
            "memory_mib": 1536,
            "disk_gib": 8,
            "image": "debian-12-offline",
            "firmware": "bios",
            "ssh_authorized_keys": list(specs[0][1].ssh_keys),
            "network": {
                "bridge": "llamavm-br0",
                "mac": "52:54:00:d5:00:1e",
                "address": "10.213.0.30/24",
            },
        },
    )
    return [*specs, ("local-vm", offline)]


SPECS = _specs()


@pytest.mark.parametrize(("inventory", "spec"), SPECS, ids=[f"{i}:{s.host}" for i, s in SPECS])
def test_every_seed_passes_the_schema_of_its_guests_cloud_init(inventory, spec) -> None:
    seed = cloudinit.render(spec)
    cloudinit.validate(seed, spec.image.cloud_init, spec.host)
    user = yaml.safe_load(seed.user_data)
    assert seed.user_data.startswith("#cloud-config\n")
    assert user["ssh_pwauth"] is False and user["disable_root"] is True
    assert user["users"][0]["name"] == spec.admin_user
    assert user["users"][0]["ssh_authorized_keys"] == list(spec.ssh_keys)
    assert user["users"][0]["lock_passwd"] is True
    assert user["hostname"] == spec.name and user["locale"] == spec.locale
    net = yaml.safe_load(seed.network_config)
    nic = net["ethernets"]["lan0"]
    assert net["version"] == 2 and nic["match"]["macaddress"] == spec.network.mac
    if spec.network.dhcp:
        assert nic["dhcp4"] is True
    else:
        assert nic["addresses"] == [spec.network.address]
    assert yaml.safe_load(seed.meta_data)["instance-id"] == seed.instance_id


def test_a_seed_that_only_the_old_cloud_init_accepts_is_caught() -> None:
    """What Debian 12's cloud-init accepts is not what an Ubuntu 24.04 guest accepts."""
    spec = SPECS[0][1]
    seed = cloudinit.render(spec)
    network = seed.network_config.replace("dhcp6: false", "dhcp6: maybe")
    bad = dataclasses.replace(seed, network_config=network)
    cloudinit.validate(bad, "22.4", "guest 22.4")  # no network schema in 22.4
    with pytest.raises(cloudinit.SeedError, match=r"25\.1.s v2 schema at ethernets\.lan0\.dhcp6"):
        cloudinit.validate(bad, "25.1", "guest 25.1")


@pytest.mark.parametrize("version", ["22.4", "25.1"])
def test_a_bad_user_data_value_is_one_line(version) -> None:
    seed = cloudinit.render(SPECS[0][1])
    bad = dataclasses.replace(
        seed, user_data=seed.user_data.replace("lock_passwd: true", "lock_passwd: 7")
    )
    with pytest.raises(cloudinit.SeedError) as caught:
        cloudinit.validate(bad, version, "h")
    assert "users.0.lock_passwd" in str(caught.value) and "\n" not in str(caught.value)


def test_the_instance_id_follows_the_seed_content_only() -> None:
    spec = SPECS[0][1]
    same = dataclasses.replace(spec, vcpus=spec.vcpus + 1)
    other = dataclasses.replace(spec, timezone="Etc/UTC")
    assert cloudinit.render(same).instance_id == cloudinit.render(spec).instance_id
    assert cloudinit.render(other).instance_id != cloudinit.render(spec).instance_id


def test_the_seed_iso_is_cidata_and_deterministic(tmp_path) -> None:
    seed = cloudinit.render(SPECS[0][1])
    first = tmp_path / "a.iso"
    assert cloudinit.write_seed(seed, first) is True
    assert cloudinit.write_seed(seed, first) is False  # same bytes: no change
    assert first.read_bytes() == cloudinit.iso_bytes(seed)
    data = first.read_bytes()
    assert data[32768 + 1 : 32768 + 6] == b"CD001" and b"cidata" in data[32768 + 40 : 32768 + 72]
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open(str(first))
    names = sorted(c.rock_ridge.name() for c in iso.list_children(rr_path="/") if c.rock_ridge)
    iso.close()
    assert [n for n in names if n not in (b".", b"..")] == [
        b"meta-data",
        b"network-config",
        b"user-data",
    ]


@pytest.mark.parametrize(("inventory", "spec"), SPECS, ids=[f"{i}:{s.host}" for i, s in SPECS])
def test_every_domain_passes_libvirts_schema(inventory, spec) -> None:
    hostvars = {"llamavm_hypervisor_virt_type": "qemu"} if inventory == "local-vm" else {}
    xml = libvirt_domain.render(spec, vmbuild.placement(spec, hostvars))
    libvirt_domain.validate(xml, spec.host)
    root = ET.fromstring(xml)
    nic = root.find("devices/interface[@type='bridge']")
    assert nic is not None
    assert nic.find("source").get("bridge") == spec.network.bridge
    assert nic.find("mac").get("address") == spec.network.mac
    hostdevs = root.findall("devices/hostdev[@type='pci']")
    wanted = [a for a in (spec.gpu.pci if spec.gpu else ())]
    found = []
    for dev in hostdevs:
        a = dev.find("source/address")
        found.append(
            f"{a.get('domain')[2:]}:{a.get('bus')[2:]}:{a.get('slot')[2:]}.{a.get('function')[2:]}"
        )
    assert found == wanted
    assert root.get("type") == ("qemu" if inventory == "local-vm" else "kvm")
    assert libvirt_domain.render(spec, vmbuild.placement(spec, hostvars)) == xml  # stable


def test_the_mmio_window_is_raised_when_the_spec_asks() -> None:
    spec = next(s for _, s in SPECS if s.gpu and s.gpu.mmio64_mib)
    xml = libvirt_domain.render(spec, libvirt_domain.Placement())
    assert f"X-PciMmio64Mb,string={spec.gpu.mmio64_mib}" in xml


def test_broken_xml_is_refused_by_libvirts_schema() -> None:
    xml = libvirt_domain.render(SPECS[0][1], libvirt_domain.Placement())
    with pytest.raises(libvirt_domain.DomainError, match=r"fails libvirt's schema"):
        libvirt_domain.validate(
            xml.replace('<vcpu placement="static">', '<vcpu placement="x">'), "h"
        )


def test_render_all_writes_once(tmp_path) -> None:
    first = vmbuild.render_all("example-lab", tmp_path)
    assert all(r.changed for r in first)
    again = vmbuild.render_all("example-lab", tmp_path)
    assert all(r.changed == [] for r in again)
    assert DEFAULT_INVENTORY == "local"
