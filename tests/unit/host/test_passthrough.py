"""The passthrough preflight (llamavm/host/passthrough.py) against recorded /sys trees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llamavm import REPO_ROOT
from llamavm.artifacts import hostpkg
from llamavm.host import passthrough

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "passthrough"
GPU = ["0000:01:00.0", "0000:01:00.1"]


def _host(tmp_path: Path, case: str) -> passthrough.Sys:
    return passthrough.replay(json.loads((FIXTURES / f"{case}.json").read_text()), tmp_path)


def _verdict(checks: list[passthrough.Check]) -> dict[str, str]:
    return {c.what: c.status for c in checks}


def test_a_good_host_can_pass_its_gpu_through(tmp_path) -> None:
    checks = passthrough.check(_host(tmp_path, "good-host"), GPU, mmio64_mib=65536)
    assert all(c.status == passthrough.OK for c in checks), checks
    assert _verdict(checks)["IOMMU group 14"] == "OK"


def test_a_32gb_card_needs_a_bigger_mmio_window(tmp_path) -> None:
    checks = passthrough.check(_host(tmp_path, "good-host"), GPU, mmio64_mib=None)
    mmio = next(c for c in checks if c.what == "64-bit MMIO")
    assert mmio.status == passthrough.FAIL and "mmio64_mib: 65536" in mmio.fix


def test_iommu_off_says_which_kernel_parameters(tmp_path) -> None:
    checks = passthrough.check(_host(tmp_path, "iommu-off"), GPU, mmio64_mib=65536)
    iommu = next(c for c in checks if c.what == "IOMMU")
    assert iommu.status == passthrough.FAIL
    assert "amd_iommu=on iommu=pt" in iommu.fix  # an AMD host
    assert _verdict(checks)["0000:01:00.0"] == "WARN"  # still on the nvidia driver


def test_a_gpu_sharing_its_group_with_another_device_cannot(tmp_path) -> None:
    checks = passthrough.check(_host(tmp_path, "shared-group"), GPU, mmio64_mib=65536)
    group = next(c for c in checks if c.what == "IOMMU group 1")
    assert group.status == passthrough.FAIL
    assert "0000:02:00.0" in group.detail and "0000:00:01.0" not in group.detail  # bridges are ok


def test_a_bridge_in_the_group_and_a_small_card_are_fine(tmp_path) -> None:
    checks = passthrough.check(_host(tmp_path, "small-card"), GPU, mmio64_mib=None)
    assert all(c.status == passthrough.OK for c in checks), checks


def test_cards_with_reset_problems_are_warned_about(tmp_path) -> None:
    pci = ["0000:03:00.0", "0000:03:00.1"]
    checks = passthrough.check(_host(tmp_path, "reset-bug"), pci, mmio64_mib=None)
    warned = [c for c in checks if c.status == passthrough.WARN]
    assert any("known reset problems" in c.detail for c in warned)
    assert all(c.status != passthrough.FAIL for c in checks)


def test_a_missing_function_fails(tmp_path) -> None:
    checks = passthrough.check(_host(tmp_path, "good-host"), ["0000:05:00.0"], 65536)
    assert _verdict(checks)["0000:05:00.0"] == "FAIL"


@pytest.mark.parametrize(
    "case", ["good-host", "iommu-off", "shared-group", "small-card", "reset-bug"]
)
def test_record_replay_round_trips(tmp_path, case) -> None:
    recording = json.loads((FIXTURES / f"{case}.json").read_text())
    pci = [a for a, d in recording["devices"].items() if int(d["class"], 16) >> 16 in (3, 4)]
    assert passthrough.record(passthrough.replay(recording, tmp_path), pci) == recording


def test_the_command_from_the_host_package(tmp_path) -> None:
    _host(tmp_path / "sys", "shared-group")
    pyz = hostpkg.build(tmp_path / "cache")
    link = tmp_path / "llamavm-passthrough"
    link.symlink_to(pyz)
    args = ["check", "--root", str(tmp_path / "sys"), "--json", *[f"--pci={a}" for a in GPU]]
    run = subprocess.run([sys.executable, str(link), *args], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    assert json.loads(run.stdout)["possible"] is False
    bad = subprocess.run(
        [sys.executable, str(link), "check", "--pci", "1:2"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "is not a PCI address" in bad.stderr


def test_the_zipapp_runs_it_as_a_subcommand_too(tmp_path) -> None:
    """How Ansible's script module runs it on a hypervisor: `python3 PYZ passthrough ...`."""
    _host(tmp_path / "sys", "good-host")
    pyz = hostpkg.build(tmp_path / "cache")
    args = ["passthrough", "check", "--root", str(tmp_path / "sys"), "--mmio64-mib", "65536"]
    run = subprocess.run(
        [sys.executable, str(pyz), *args, *[f"--pci={a}" for a in GPU]],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "passthrough can work" in run.stdout
