"""The hypervisor role on the test bed, with recorded /sys trees standing in for GPU hosts
(nothing here has an IOMMU): the preflight's verdict stops the role where it can't make
passthrough work, and in check mode the role plans exactly the boot changes passthrough needs.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest

from llamavm import REPO_ROOT
from llamavm.artifacts import hostpkg
from llamavm.host import passthrough
from tests.integration.conftest import INVENTORY, VENV_BIN, ansible_env
from tests.integration.helpers import host_run

pytestmark = pytest.mark.testbed
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "passthrough"
GPU = ["0000:01:00.0", "0000:01:00.1"]


def _replay_on_host(case: str) -> str:
    """The recording `case` as a /sys + /proc tree on the test bed host; its root."""
    root = f"/tmp/llamavm-sys-{case}-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as tmp:
        passthrough.replay(json.loads((FIXTURES / f"{case}.json").read_text()), Path(tmp))
        archive = Path(tmp) / "tree.tar"
        with tarfile.open(archive, "w") as tar:
            for child in ("sys", "proc"):
                tar.add(Path(tmp) / child, arcname=child)
        from llamavm.testbed import config, machine

        cfg, paths = config.load_config(), config.Paths.from_env()
        subprocess.run(
            [*machine.ssh_base_command(cfg, paths), f"mkdir -p {root} && tar -x -C {root}"],
            stdin=archive.open("rb"),
            check=True,
        )
    return root


def _converge(root: str, tmp_path: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    play = tmp_path / "hypervisor.yml"
    play.write_text(
        "---\n- name: The hypervisor role against a recorded GPU host\n"
        "  hosts: llamavm_hosts\n  become: true\n  gather_facts: false\n"
        "  roles:\n    - role: hypervisor\n"
    )
    extra = {
        "hypervisor_packages": [],
        "hypervisor_manage_services": False,
        "hypervisor_gpu_pci": GPU,
        "hypervisor_gpu_mmio64_mib": 65536,
        "hypervisor_host_package": str(hostpkg.build()),
        "hypervisor_sysfs_root": root,
    }
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps(extra))
    argv = [str(VENV_BIN / "ansible-playbook"), "-i", str(INVENTORY), "-e", f"@{vars_file}",
            str(play)]  # fmt: skip
    if check:
        argv += ["--check", "--diff"]
    return subprocess.run(
        argv, cwd=REPO_ROOT / "ansible", env=ansible_env(), capture_output=True, text=True
    )


def test_a_good_host_plans_the_iommu_and_vfio_boot_changes(provisioned_testbed, tmp_path) -> None:
    root = _replay_on_host("good-host")
    try:
        result = _converge(root, tmp_path)
    finally:
        host_run(f"rm -rf {root}")
    out = result.stdout
    assert result.returncode == 0, out[-4000:]
    assert 'GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT intel_iommu=on iommu=pt"' in out
    assert "options vfio-pci ids=10de:2b85,10de:22e8 disable_vga=1" in out
    assert "softdep nvidia pre: vfio-pci" in out and "softdep nouveau pre: vfio-pci" in out
    assert "vfio_pci" in out  # loaded early
    # check mode changed nothing on the host
    assert host_run("test -e /etc/modprobe.d/llamavm-vfio.conf").returncode != 0


def test_an_amd_host_with_the_iommu_off_gets_its_parameters(provisioned_testbed, tmp_path) -> None:
    root = _replay_on_host("iommu-off")
    try:
        result = _converge(root, tmp_path)
    finally:
        host_run(f"rm -rf {root}")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "amd_iommu=on iommu=pt" in result.stdout  # the IOMMU being off is this role's job


def test_a_gpu_sharing_its_group_stops_the_role_before_any_change(
    provisioned_testbed, tmp_path
) -> None:
    root = _replay_on_host("shared-group")
    try:
        result = _converge(root, tmp_path, check=False)
    finally:
        host_run(f"rm -rf {root}")
    assert result.returncode != 0
    assert "GPU passthrough cannot work on testbed" in result.stdout
    assert "share it with 0000:02:00.0" in result.stdout
    assert host_run("test -e /etc/default/grub.d/90-llamavm-iommu.cfg").returncode != 0
