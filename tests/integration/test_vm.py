"""The VM builder for real, on this machine: a libvirt VM (TCG) built from its spec with the
rendered cloud-init seed, on the test bed's LAN bridge, converged by the same roles as any
model host, serving a model to the LAN client. Marker `vm` (minutes under TCG)."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from llamavm import REPO_ROOT
from llamavm.artifacts import hostpkg
from llamavm.ops import playbook, provision
from llamavm.platforms.vm import vmbuild, vmspec
from tests.integration.helpers import (
    VM_INVENTORY as INVENTORY,
)
from tests.integration.helpers import (
    client_curl,
    http_code,
    invoke,
    ssh_from_lan,
)

pytestmark = [pytest.mark.testbed, pytest.mark.vm]


def test_cloud_init_finished_with_the_rendered_seed(vm) -> None:
    result = ssh_from_lan(vm, "cloud-init status --long; hostname; cat /etc/timezone")
    assert result.returncode == 0, result.stderr
    assert "status: done" in result.stdout
    assert vm.name in result.stdout.split()


def test_key_login_from_the_lan_and_no_passwords(vm) -> None:
    assert ssh_from_lan(vm, "true", "-o", "BatchMode=yes").returncode == 0
    refused = ssh_from_lan(
        vm,
        "true",
        "-o", "BatchMode=yes", "-o", "PubkeyAuthentication=no",
        "-o", "PreferredAuthentications=password,keyboard-interactive",
    )  # fmt: skip
    assert refused.returncode != 0
    assert "Permission denied (publickey)" in refused.stderr


def test_the_domain_has_the_specs_bridge_and_mac(vm) -> None:
    xml = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", vm.name],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    root = ET.fromstring(xml)
    nic = root.find("devices/interface[@type='bridge']")
    assert nic is not None and nic.find("source").get("bridge") == vm.network.bridge
    assert nic.find("mac").get("address") == vm.network.mac
    assert root.get("type") == "qemu"  # TCG: /dev/kvm here hangs stock kernels


def test_the_guest_runs_the_portable_artifact_and_serves_the_lan(vm, models) -> None:
    info = json.loads(ssh_from_lan(vm, "cat /opt/llama.cpp/current/BUILD-INFO.json").stdout)
    assert info["built_by"] == "artifact"
    assert info["key_inputs"]["flags"]["GGML_NATIVE"] == "OFF"
    base = f"http://{vm.network.ip}:{models.default.port}"
    assert http_code(f"{base}/health") == 200
    chat = client_curl(
        f"{base}/v1/chat/completions",
        "-H", "Content-Type: application/json",
        "-d", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        timeout=120,
    )  # fmt: skip
    body, code = chat.stdout.rsplit("\n", 1)
    assert code == "200", body
    page = client_curl(f"{base}/")
    assert page.stdout.rsplit("\n", 1)[-1] == "200" and "<html" in page.stdout.lower()


def test_switch_works_on_the_vm(vm, models) -> None:
    other = next(m for m in models.models if m != models.default)
    result = invoke("switch", "-i", INVENTORY, "--model", other.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert http_code(f"http://{vm.network.ip}:{other.port}/health") == 200
    assert http_code(f"http://{vm.network.ip}:{models.default.port}/health") is None
    assert invoke("switch", "-i", INVENTORY, "--model", models.default.name).returncode == 0


def test_a_second_provision_changes_nothing(vm) -> None:
    result = invoke("provision", "-i", INVENTORY, timeout=3600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    assert "no changes" in result.stdout, result.stdout[-3000:]


def test_vm_list_shows_it_running(vm) -> None:
    result = invoke("vm.list", "-i", INVENTORY, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    nas = vmspec.from_inventory(INVENTORY, only="llamavm-nas")[0]
    assert rows == [
        {
            "vm": spec.name,
            "host": spec.host,
            "hypervisor": "localhost",
            "state": "running",
            "address": spec.network.ip,
            "restart_needed": False,
        }
        for spec in (vm, nas)
    ]


def _vm_playbook(inventory: Path) -> None:
    vms = vmbuild.prepare(str(inventory), say=lambda _: None)
    extra = {"llamavm_vms": vms, "llamavm_host_package": str(hostpkg.build())}
    rc, _ = playbook.run_playbook(provision.VM_PLAYBOOK, inventory, extra, echo=lambda _: None)
    assert rc == 0


def test_a_changed_spec_is_stored_and_waits_for_a_restart(vm, tmp_path) -> None:
    changed = tmp_path / "local-vm"
    shutil.copytree(REPO_ROOT / "inventories" / INVENTORY, changed)
    spec_file = changed / "host_vars" / "llamavm-vm.yml"
    data = yaml.safe_load(spec_file.read_text())
    data["llamavm_vm"]["memory_mib"] += 512
    spec_file.write_text(yaml.safe_dump(data))
    pid = subprocess.run(["pgrep", "-f", f"guest={vm.name}"], capture_output=True, text=True)
    try:
        _vm_playbook(changed)
        rows = json.loads(invoke("vm.list", "-i", str(changed), "--json").stdout)
        assert rows[0]["vm"] == vm.name
        assert rows[0]["state"] == "running" and rows[0]["restart_needed"] is True
        assert rows[1]["restart_needed"] is False  # the NFS server's spec did not change
        stored = subprocess.run(
            ["virsh", "-c", "qemu:///system", "dumpxml", "--inactive", vm.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f">{(vm.memory_mib + 512) * 1024}</memory>" in stored
    finally:
        _vm_playbook(REPO_ROOT / "inventories" / INVENTORY)  # the spec as it was
    rows = json.loads(invoke("vm.list", "-i", INVENTORY, "--json").stdout)
    assert rows[0]["restart_needed"] is False
    again = subprocess.run(["pgrep", "-f", f"guest={vm.name}"], capture_output=True, text=True)
    assert again.stdout == pid.stdout  # the VM was never restarted
