"""Proxmox VE: the example inventory's VM (GPU passthrough, huge pages, a static address)
created through proxmoxer against a fake Proxmox API over TLS (tests/unit/fakes/proxmox.py),
which records every request; the root-only steps are recorded from the SSH seam, and the
image fetch script runs for real on local files."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from llamavm import REPO_ROOT
from llamavm.ops import remote
from llamavm.platforms import proxmox
from llamavm.platforms.vm import cloudinit, vmbuild, vmspec
from tests.unit.fakes.proxmox import FakeProxmox

INVENTORY = REPO_ROOT / "inventories" / "example-proxmox"
SECRET = "8a2f6c1e-5d43-4f0b-9b7e-2c1d0e9f8a7b"


@functools.cache
def _hostvars() -> dict[str, Any]:
    return remote.inventory_data(INVENTORY)["_meta"]["hostvars"]


@pytest.fixture
def pve(tmp_path) -> Iterator[FakeProxmox]:
    fake = FakeProxmox(tmp_path, f"llamavm@pve!llamavm={SECRET}")
    yield fake
    fake.close()


@pytest.fixture
def node(pve, tmp_path) -> proxmox.Target:
    token = tmp_path / "pve-1.token"
    token.write_text(SECRET + "\n")
    token.chmod(0o600)
    example = proxmox.target("example-proxmox", "pve-1.lan", _hostvars()["pve-1.lan"])
    return dataclasses.replace(
        example, api_host="127.0.0.1", api_port=pve.port, token_file=token,
        verify_tls=str(pve.cert),
    )  # fmt: skip


@pytest.fixture(scope="module")
def spec() -> vmspec.VmSpec:
    (found,) = vmspec.from_inventory(str(INVENTORY))
    return found


class Ssh:
    """The SSH seam: records what root would run on the node."""

    def __init__(self, fail: str = "") -> None:
        self.runs: list[tuple[tuple[str, ...], str | None]] = []
        self.fail = fail

    def __call__(self, argv: tuple[str, ...], stdin: str | None) -> tuple[int, str]:
        self.runs.append((argv, stdin))
        return (1, "qm: no such VM") if self.fail and self.fail in argv else (0, "")


def _apply(spec, node, ssh=None, say=None) -> str:
    seed = cloudinit.render(spec)
    return proxmox.apply(
        spec, seed, node, proxmox.proxmoxer_api(node), ssh or Ssh(), say or (lambda _: None)
    )


def test_a_vm_with_a_passed_through_gpu_is_created_in_this_order(pve, node, spec) -> None:
    ssh = Ssh()
    assert _apply(spec, node, ssh) == "created"
    calls = [(m, p) for m, p, _ in pve.requests if "/tasks/" not in p]
    assert calls == [
        ("GET", "nodes/pve-1/qemu/201/config"),
        ("GET", "storage/local"),
        ("GET", "storage/local"),
        ("POST", "nodes/pve-1/qemu"),
        ("PUT", "nodes/pve-1/qemu/201/resize"),
        ("POST", "nodes/pve-1/qemu/201/status/start"),
        ("PUT", "nodes/pve-1/qemu/201/config"),  # marked complete, last
    ]
    # Every task was waited for, to its end.
    tasks = [p for _, p, _ in pve.requests if "/tasks/" in p]
    assert [t.split(":")[5] for t in tasks] == ["qmcreate", "resize", "qmstart"]
    created = next(
        params for m, p, params in pve.requests if (m, p) == ("POST", "nodes/pve-1/qemu")
    )
    sha = spec.image.sha256 or ""
    assert created == {
        "vmid": "201",
        "name": "gpu-box-3",
        "description": f"llamavm model host gpu-box-3.lan; spec {spec.digest}",
        "ostype": "l26",
        "machine": "q35",
        "bios": "ovmf",
        "efidisk0": "local-lvm:1,efitype=4m,pre-enrolled-keys=0",
        "cpu": "host",
        "sockets": "1",
        "cores": "12",
        "memory": "65536",
        "balloon": "0",
        "numa": "1",
        "hugepages": "1024",
        "scsihw": "virtio-scsi-single",
        "scsi0": f"local-lvm:0,import-from=local:import/llamavm-ubuntu-24.04-{sha[:12]}.qcow2,"
        "discard=on,iothread=1",
        "ide2": "local-lvm:cloudinit",
        "cicustom": "user=local:snippets/llamavm-gpu-box-3-user.yaml,"
        "network=local:snippets/llamavm-gpu-box-3-network.yaml,"
        "meta=local:snippets/llamavm-gpu-box-3-meta.yaml",
        "net0": "virtio=52:54:00:4c:56:03,bridge=vmbr0",
        "serial0": "socket",
        "boot": "order=scsi0",
        "onboot": "1",
    }
    assert pve.vms[201]["size"] == "100G" and 201 in pve.running
    # Root's part: the seed as snippets, the pinned image, raw PCI passthrough, the MMIO window.
    seed = cloudinit.render(spec).files()
    argvs = [argv for argv, _ in ssh.runs]
    assert ssh.runs[:3] == [
        (("install", "-D", "-m", "0640", "/dev/stdin",
          f"/var/lib/vz/snippets/llamavm-gpu-box-3-{kind}.yaml"), seed[name])
        for kind, name in (("user", "user-data"), ("network", "network-config"),
                           ("meta", "meta-data"))
    ]  # fmt: skip
    assert argvs[3][:2] == ("sh", "-c") and argvs[3][4:] == (
        spec.image.url,
        sha,
        f"/var/lib/vz/import/llamavm-ubuntu-24.04-{sha[:12]}.qcow2",
    )
    assert argvs[4] == ("qm", "set", "201", "--hostpci0", "0000:01:00,pcie=1")
    assert argvs[5] == (
        "qm", "set", "201", "--args", "-fw_cfg name=opt/ovmf/X-PciMmio64Mb,string=65536"
    )  # fmt: skip
    # The snippets go before the VM that names them; passthrough before the first start.
    assert len(argvs) == 6


def test_the_seed_snippets_are_the_same_cloud_init_as_libvirts(spec) -> None:
    user = yaml.safe_load(cloudinit.render(spec).user_data)
    assert user["hostname"] == "gpu-box-3" and user["ssh_pwauth"] is False
    network = yaml.safe_load(cloudinit.render(spec).network_config)
    assert network["ethernets"]["lan0"]["match"]["macaddress"] == "52:54:00:4c:56:03"


def test_a_second_run_changes_nothing(pve, node, spec) -> None:
    assert _apply(spec, node) == "created"
    pve.requests.clear()
    ssh, said = Ssh(), []
    assert _apply(spec, node, ssh, said.append) == "unchanged"
    assert [(m, p) for m, p, _ in pve.requests] == [("GET", "nodes/pve-1/qemu/201/config")]
    assert ssh.runs == [] and "up to date" in said[-1]


def test_a_creation_cut_short_is_taken_up_again_not_called_done(pve, node, spec) -> None:
    pve.fail_task = "qmstart"  # say, the controller lost the node before the start
    with pytest.raises(proxmox.ProxmoxError, match="start VM 201 failed"):
        _apply(spec, node)
    assert not pve.vms[201]["description"].endswith("; complete") and 201 in pve.running
    pve.running.clear()
    pve.fail_task, pve.requests = None, []
    ssh = Ssh()
    assert _apply(spec, node, ssh) == "resumed"
    calls = [(m, p) for m, p, _ in pve.requests if "/tasks/" not in p]
    assert calls == [
        ("GET", "nodes/pve-1/qemu/201/config"),
        ("PUT", "nodes/pve-1/qemu/201/resize"),
        ("POST", "nodes/pve-1/qemu/201/status/start"),
        ("PUT", "nodes/pve-1/qemu/201/config"),
    ]  # no second create
    assert [argv[:3] for argv, _ in ssh.runs] == [("qm", "set", "201"), ("qm", "set", "201")]
    assert 201 in pve.running and pve.vms[201]["description"].endswith("; complete")
    assert _apply(spec, node) == "unchanged"


def test_a_vm_id_taken_by_another_vm_is_refused_untouched(pve, node, spec) -> None:
    pve.vms[201] = {"name": "someone-elses", "description": "not ours"}
    ssh = Ssh()
    with pytest.raises(proxmox.ProxmoxError, match=r"exists on pve-1\.lan with another spec"):
        _apply(spec, node, ssh)
    assert [m for m, _, _ in pve.requests] == ["GET"] and ssh.runs == []
    assert pve.vms[201]["name"] == "someone-elses"


def test_a_pci_resource_mapping_passes_the_gpu_through_the_api(pve, node, spec) -> None:
    mapped = dataclasses.replace(spec, proxmox=vmspec.ProxmoxVm(201, "rtx4090"))
    ssh = Ssh()
    _apply(mapped, node, ssh)
    created = next(params for m, p, params in pve.requests if m == "POST" and p.endswith("qemu"))
    assert created["hostpci0"] == "mapping=rtx4090,pcie=1"
    assert not any(argv[:2] == ("qm", "set") and "--hostpci0" in argv for argv, _ in ssh.runs)


def test_a_storage_without_imports_is_refused_before_anything_is_written(pve, node, spec):
    pve.storage["local"] = "iso,vztmpl,backup,snippets"
    ssh = Ssh()
    with pytest.raises(proxmox.ProxmoxError) as caught:
        _apply(spec, node, ssh)
    assert "storage local doesn't take import" in str(caught.value)
    assert "pvesm set local --content iso,vztmpl,backup,snippets,import" in str(caught.value)
    assert ssh.runs == [] and pve.vms == {}


def test_a_failed_task_and_a_failed_root_step_stop_with_the_reason(pve, node, spec) -> None:
    pve.fail_task = "qmcreate"
    with pytest.raises(proxmox.ProxmoxError, match=r"create VM 201 .* failed: command failed"):
        _apply(spec, node)
    ssh = Ssh(fail="qm")
    spec2 = dataclasses.replace(spec, proxmox=vmspec.ProxmoxVm(202, None))
    pve.fail_task = None
    with pytest.raises(proxmox.ProxmoxError, match=r"pass the GPU through .*exit 1.*no such VM"):
        _apply(spec2, node, ssh)


def test_a_wrong_token_and_an_untrusted_certificate_are_one_line_errors(pve, node, spec) -> None:
    node.token_file.write_text("wrong-secret\n")
    with pytest.raises(proxmox.ProxmoxError, match="401"):
        _apply(spec, node)
    node.token_file.write_text(SECRET + "\n")
    with pytest.raises(proxmox.ProxmoxError, match="did not answer"):
        _apply(spec, dataclasses.replace(node, verify_tls=True))  # not signed by a known CA
    assert pve.vms == {}


def test_a_token_file_others_can_read_is_refused(node, spec) -> None:
    node.token_file.chmod(0o644)
    with pytest.raises(proxmox.ProxmoxError, match=r"readable by others .* chmod 600"):
        node.token()


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("llamavm_proxmox_api_token_file", None, "llamavm_proxmox_api_token_file is not set"),
        ("llamavm_proxmox_api_port", "eighty", "is not a port"),
        ("llamavm_proxmox_storage", "local lvm", "has a space"),
        ("llamavm_proxmox_verify_tls", "", "use true, or the path"),
    ],
)
def test_bad_hypervisor_settings_are_one_line(key, value, fragment) -> None:
    hostvars = {**_hostvars()["pve-1.lan"], key: value}
    with pytest.raises(proxmox.ProxmoxError, match=fragment):
        proxmox.target("example-proxmox", "pve-1.lan", hostvars)


def test_an_image_built_here_is_refused_on_proxmox(spec, node) -> None:
    offline = vmspec.images()["debian-12-offline"]
    with pytest.raises(proxmox.ProxmoxError, match="use a pinned cloud image"):
        proxmox.plan(dataclasses.replace(spec, image=offline), cloudinit.render(spec), node)


def test_the_image_fetch_verifies_the_pin_and_keeps_a_good_copy(tmp_path) -> None:
    image = tmp_path / "noble.img"
    image.write_bytes(b"qcow2 stand-in" * 1000)
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    dest = tmp_path / "import" / "llamavm-ubuntu-24.04.qcow2"

    def fetch(digest: str) -> subprocess.CompletedProcess[str]:
        argv = ["sh", "-c", proxmox.FETCH_IMAGE, "llamavm-fetch", image.as_uri(), digest, str(dest)]
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    bad = fetch("0" * 64)
    assert bad.returncode == 1 and "does not match the pinned sha256" in bad.stderr
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
    assert fetch(sha).returncode == 0 and dest.read_bytes() == image.read_bytes()
    image.write_bytes(b"changed upstream")
    assert fetch(sha).returncode == 0 and dest.read_bytes() != image.read_bytes()  # kept


def test_one_multifunction_device_is_one_hostpci_entry(spec) -> None:
    assert proxmox.pci_entries(spec) == ["0000:01:00,pcie=1"]
    assert spec.gpu is not None
    two = dataclasses.replace(spec, gpu=vmspec.Gpu(("0000:01:00.0", "0000:02:00.0"), None))
    assert proxmox.pci_entries(two) == ["0000:01:00.0,pcie=1", "0000:02:00.0,pcie=1"]


def test_provision_gives_the_proxmox_vm_to_proxmox_not_libvirt(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))
    (vm,) = vmbuild.prepare(str(INVENTORY), say=lambda _: None)
    assert (vm["kind"], vm["hypervisor"], vm["host"]) == ("proxmox", "pve-1.lan", "gpu-box-3.lan")
    said: list[str] = []
    assert proxmox.create_vms(str(INVENTORY), said.append, check=True) == ["gpu-box-3.lan"]
    assert any("API POST nodes/pve-1/qemu vmid=201" in line for line in said)
    assert any("qm set 201 --hostpci0 0000:01:00,pcie=1" in line for line in said)


def test_a_proxmox_vm_without_an_id_is_refused_before_anything(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))
    inventory = tmp_path / "example-proxmox"
    shutil.copytree(INVENTORY, inventory)
    spec_file = inventory / "host_vars" / "gpu-box-3.lan.yml"
    data = yaml.safe_load(spec_file.read_text())
    del data["llamavm_vm"]["proxmox"]
    spec_file.write_text(yaml.safe_dump(data))
    with pytest.raises(proxmox.ProxmoxError, match=r"llamavm_vm\.proxmox\.vmid is missing"):
        vmbuild.prepare(str(inventory), say=lambda _: None)
