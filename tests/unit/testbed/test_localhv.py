"""The embedded lab makes its own SSH key pair: a fresh machine has none, and the VM specs read
the public key while rendering (CI on a clean machine failed on exactly this)."""

from __future__ import annotations

import os
import stat
import subprocess

from llamavm.testbed import localhv


def _hostvars(pub, hypervisor="localhost"):
    return {"llamavm-vm": {"llamavm_vm": {"hypervisor": hypervisor, "ssh_public_key_file": pub}}}


def test_missing_lab_key_is_made_0600_in_a_0700_folder(tmp_path):
    pub = tmp_path / "vm" / "id_ed25519.pub"
    lines = []
    localhv.ensure_keys(_hostvars(str(pub)), lines.append)
    key = tmp_path / "vm" / "id_ed25519"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert pub.read_text().startswith("ssh-ed25519 ")
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True)
    assert derived.stdout.split()[:2] == pub.read_text().split()[:2]
    assert lines == [f"llamavm: made the embedded lab's SSH key pair {key} (for llamavm-vm)"]


def test_existing_key_kept_and_missing_pub_derived(tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    before = key.read_bytes()
    first_pub = (tmp_path / "id_ed25519.pub").read_text()
    os.unlink(tmp_path / "id_ed25519.pub")
    localhv.ensure_keys(_hostvars(str(tmp_path / "id_ed25519.pub")), lambda line: None)
    assert key.read_bytes() == before
    assert (tmp_path / "id_ed25519.pub").read_text().split()[:2] == first_pub.split()[:2]
    lines = []
    localhv.ensure_keys(_hostvars(str(tmp_path / "id_ed25519.pub")), lines.append)
    assert lines == []  # present: nothing made, nothing said


def test_a_remote_hypervisors_vm_key_is_the_operators(tmp_path):
    pub = tmp_path / "id_ed25519.pub"
    localhv.ensure_keys(_hostvars(str(pub), hypervisor="kvm-1.lan"), lambda line: None)
    assert not pub.exists() and not (tmp_path / "id_ed25519").exists()
