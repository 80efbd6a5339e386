"""VM specs (llamavm/platforms/vm/vmspec.py): every example validates; every bad value is one
line that names the inventory, the host and the key, with the fix — exit code 2, no traceback."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamavm import REPO_ROOT
from llamavm.platforms.vm import vmspec

EXAMPLE = REPO_ROOT / "inventories" / "example-lab"
GOOD: dict[str, Any] = yaml.safe_load((EXAMPLE / "host_vars" / "gpu-box-1.lan.yml").read_text())[
    "llamavm_vm"
]
KEY = GOOD["ssh_authorized_keys"][0]


def _parse(spec: dict[str, Any]) -> vmspec.VmSpec:
    return vmspec.parse("inv: host h", "gpu-box-1.lan", spec)


def _mutated(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return data


_DELETE = object()


def test_every_example_inventory_validates() -> None:
    specs = vmspec.from_inventory("example-lab")
    assert [s.name for s in specs] == ["gpu-box-1", "gpu-box-2"]
    first = specs[0]
    assert first.gpu and first.gpu.pci == ("0000:01:00.0", "0000:01:00.1")
    assert first.network.ip == "192.168.1.51" and not first.network.dhcp
    assert first.image.cloud_init == "25.1" and first.image.sha256
    assert specs[1].network.dhcp and specs[1].hugepages is None
    assert vmspec.from_inventory("example-wsl") == []  # no VMs there: WSL hosts


CASES = [
    ("gpu.pci.0", "0000:01:00", "gpu.pci[0]: '0000:01:00' is not a PCI address"),
    ("gpu.pci.0", "01:00.0", "is not a PCI address"),
    ("gpu.pci.1", "0000:01:00.8", "is not a PCI address"),
    ("gpu.pci.1", "0000:01:00.0", "lists a function twice"),
    ("ssh_authorized_keys", [], "no SSH key for the admin user"),
    ("ssh_authorized_keys", ["ssh-ed25519"], "is not an OpenSSH public key"),
    ("ssh_authorized_keys", [KEY + "\nssh-rsa AAAA evil"], "control character U+000A"),
    ("image", "ubuntu-99.04", "'ubuntu-99.04' is not an image of config/images.yaml"),
    ("image_sha256", _DELETE, "the download of ubuntu-24.04 is not pinned"),
    ("network.mac", "52:54:00:4C:56:01", "is not a MAC address"),
    ("network.mac", "01:54:00:4c:56:01", "not a locally administered unicast address"),
    ("network.address", "192.168.1.0/24", "is the network or broadcast address"),
    ("network.address", "192.168.1.51", "is not dhcp or an IPv4 address with prefix"),
    ("network.gateway", "10.0.0.1", "10.0.0.1 is outside 192.168.1.0/24"),
    ("network.bridge", "a-very-long-bridge-name", "is not a bridge interface name"),
    ("memory_mib", 98305, "is not a whole number of 1G huge pages"),
    ("memory_mib", 512, "512 is below 1024"),
    ("vcpus", 8, "16 entries (16 different) for 8 vCPUs"),
    ("cpu_pinning", [2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], "15 different"),
    ("firmware", "bios", "GPU passthrough with machine q35 and firmware bios"),
    ("machine", "pc", "use machine: q35 and firmware: efi"),
    ("vcpus", True, "True is a boolean"),
    ("timezone", "Europe/Berlin; rm -rf /", "is not a time zone"),
    ("hypervisor", _DELETE, "llamavm_vm.hypervisor: is missing"),
    ("disks", 2, "llamavm_vm.disks: unknown key"),
]


@pytest.mark.parametrize(("path", "value", "fragment"), CASES, ids=[c[2][:40] for c in CASES])
def test_each_bad_value_gives_one_clear_line(path, value, fragment) -> None:
    with pytest.raises(vmspec.VmSpecError) as caught:
        _parse(_mutated(path, value))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("inv: host h: llamavm_vm")
    assert " — " in message
    assert fragment in message
    assert caught.value.exit_code == 2


def test_dhcp_with_a_gateway_is_refused() -> None:
    data = _mutated("network.address", "dhcp")
    with pytest.raises(vmspec.VmSpecError, match="a gateway with DHCP"):
        _parse(data)


def test_a_key_file_on_the_controller(tmp_path) -> None:
    pub = tmp_path / "id.pub"
    pub.write_text(KEY + "\n")
    data = _mutated("ssh_authorized_keys", [])
    data["ssh_public_key_file"] = str(pub)
    assert _parse(data).ssh_keys == (KEY,)
    data["ssh_public_key_file"] = str(tmp_path / "missing.pub")
    with pytest.raises(vmspec.VmSpecError, match="cannot read"):
        _parse(data)


def _inventory(tmp_path: Path, platform: str, host_vars: dict[str, Any]) -> Path:
    inv = tmp_path / "inv"
    shutil.copytree(EXAMPLE, inv)
    (inv / "group_vars" / "all" / "llamavm.yml").write_text(
        yaml.safe_dump({"llamavm_catalog": "config/models.yaml", "llamavm_platform": platform})
    )
    for host, spec in host_vars.items():
        (inv / "host_vars" / f"{host}.yml").write_text(yaml.safe_dump({"llamavm_vm": spec}))
    return inv


def test_an_unknown_platform_is_one_line(tmp_path, invoke_cli) -> None:
    inv = _inventory(tmp_path, "proxmox", {})
    result = invoke_cli("vm.render", "--inventory", str(inv), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "llamavm_platform: 'proxmox' is not a platform" in lines[0]


@pytest.mark.parametrize(
    ("platform", "fragment"),
    [
        ("hyperv", "discrete device assignment, on Windows Server"),
        ("multipass", "no GPU passthrough"),
    ],
)
def test_a_platform_without_a_gpu_path_points_to_one_that_has(
    tmp_path, invoke_cli, platform, fragment
) -> None:
    inv = _inventory(tmp_path, platform, {})
    for task in (("vm.render", "--inventory", str(inv)), ("doctor", "--inventory", str(inv))):
        result = invoke_cli(*task)
        assert result.returncode != 0
        out = result.stderr + result.stdout
        assert fragment in out and "llamavm_platform: wsl" in out, out


def test_a_vm_spec_on_a_wsl_host_is_refused(tmp_path) -> None:
    inv = _inventory(tmp_path, "wsl", {})
    with pytest.raises(vmspec.VmSpecError, match="'wsl' has no VM spec"):
        vmspec.from_inventory(str(inv))


def test_two_vms_with_one_mac_are_refused(tmp_path) -> None:
    twin = copy.deepcopy(GOOD)
    twin["network"]["address"] = "192.168.1.60/24"
    inv = _inventory(tmp_path, "vm", {"gpu-box-2.lan": twin})
    with pytest.raises(vmspec.VmSpecError, match="MAC 52:54:00:4c:56:01 is also host"):
        vmspec.from_inventory(str(inv))


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        ("gpu.pci.0", "0000:1:00.0", "is not a PCI address"),
        ("ssh_authorized_keys", [], "no SSH key for the admin user"),
        ("image", "windows-11", "is not an image of config/images.yaml"),
    ],
)
def test_the_cli_gives_one_line_and_exit_2(tmp_path, invoke_cli, path, value, fragment) -> None:
    inv = _inventory(tmp_path, "vm", {"gpu-box-1.lan": _mutated(path, value)})
    result = invoke_cli("vm.render", "--inventory", str(inv), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamavm: ") and fragment in lines[0]
    assert "host gpu-box-1.lan" in lines[0]


def test_a_relative_inventory_path_finds_its_hosts(monkeypatch) -> None:
    # ansible-inventory runs in ansible/: a path relative to the caller's directory found
    # an empty inventory there ("no hosts in group llamavm_hosts").
    monkeypatch.chdir(REPO_ROOT)
    hosts = [s.host for s in vmspec.from_inventory("inventories/example-lab")]
    assert hosts == ["gpu-box-1.lan", "gpu-box-2.lan"]
