"""`invoke vm.destroy --purge` forgets the VM's host key along with its disk."""

from __future__ import annotations

import subprocess

import pytest

from llamavm.platforms.vm import vmctl, vmspec


@pytest.fixture(autouse=True)
def _no_lab_key(monkeypatch) -> None:
    """The lab's key pair exists only once the lab was brought up: these tests don't need it."""
    monkeypatch.setattr(vmspec, "ssh_keys", lambda fail, raw: ("ssh-ed25519 AAAAC3Nz test",))


def test_purge_forgets_the_host_key_of_the_vm_only(tmp_path, monkeypatch) -> None:
    spec = vmspec.from_inventory("local-vm")[0]
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)  # fmt: skip
    key = (tmp_path / "k.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"{spec.network.ip} {' '.join(key)}\n10.9.9.9 {' '.join(key)}\n")
    monkeypatch.setattr(vmctl, "known_hosts_files", lambda inventory, s: [str(known)])
    ran: list[list[str]] = []
    monkeypatch.setattr(
        vmctl, "_run", lambda hv, hvars, argv: ran.append(argv) or subprocess.CompletedProcess(
            argv, 0, "", "")
    )  # fmt: skip
    done = vmctl.destroy("local-vm", spec.name, purge=True, dry=False)
    assert [a[:2] for a in ran] == [["virsh", "-c"], ["virsh", "-c"], ["rm", "-f"]]
    hosts = [line.split()[0] for line in known.read_text().splitlines() if line.strip()]
    assert hosts == ["10.9.9.9"]
    assert any("forgot the host key" in line for line in done)


def test_the_known_hosts_file_comes_from_the_inventory() -> None:
    spec = vmspec.from_inventory("local-vm")[0]
    assert vmctl.known_hosts_files("local-vm", spec) == ["/var/lib/llamavm/vm/known_hosts"]
