"""testinfra checks of the hypervisor role on the embedded hypervisor (this machine): what
libvirt VMs need is installed and answers; its boot was not touched."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "package", ["qemu-system-x86", "qemu-utils", "libvirt-daemon-system", "libvirt-clients", "ovmf"]
)
def test_the_hypervisor_packages_are_installed(host, package) -> None:
    assert host.package(package).is_installed


def test_libvirt_answers_and_runs_the_lab_vms(host) -> None:
    version = host.run("virsh -c qemu:///system version")
    assert version.rc == 0, version.stderr
    assert "QEMU" in version.stdout
    running = host.check_output("virsh -c qemu:///system list --name").split()
    assert {"llamavm-vm", "llamavm-nas"} <= set(running)


def test_the_boot_of_this_machine_was_left_alone(host) -> None:
    """hypervisor_manage_boot is false here: no IOMMU, vfio or bridge files were written."""
    for path in (
        "/etc/default/grub.d/90-llamavm-iommu.cfg",
        "/etc/modprobe.d/llamavm-vfio.conf",
        "/etc/modules-load.d/llamavm-vfio.conf",
    ):
        assert not host.file(path).exists, path
