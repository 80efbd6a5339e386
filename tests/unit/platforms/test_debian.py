"""The last steps every Debian tree llamavm builds takes (llamavm/platforms/debian.py), and the
offline VM image's post-install on top of them — on a fake tree, no debootstrap, no root."""

from __future__ import annotations

from pathlib import Path

from llamavm.platforms import debian
from llamavm.platforms.vm import vmimage


def _tree(root: Path) -> Path:
    for folder in ("etc/ssh", "etc/default", "etc/cloud/cloud.cfg.d", "var/lib/dbus",
                   "var/cache/apt/archives"):  # fmt: skip
        (root / folder).mkdir(parents=True)
    for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "ssh_host_rsa_key"):
        (root / "etc" / "ssh" / name).write_text("secret\n")
    (root / "etc" / "ssh" / "sshd_config").write_text("PermitRootLogin no\n")
    (root / "etc" / "machine-id").write_text("0123456789abcdef\n")
    (root / "var" / "lib" / "dbus" / "machine-id").write_text("0123456789abcdef\n")
    (root / "var" / "cache" / "apt" / "archives" / "curl_8.0_amd64.deb").write_bytes(b"!")
    (root / "var" / "cache" / "apt" / "archives" / "lock").write_text("")
    return root


def test_a_generalized_tree_has_no_identity_and_no_downloads(tmp_path) -> None:
    root = _tree(tmp_path)
    debian.generalize(root)
    assert sorted(p.name for p in (root / "etc" / "ssh").iterdir()) == ["sshd_config"]
    assert (root / "etc" / "machine-id").read_text() == ""
    assert (root / "etc" / "default" / "locale").read_text() == "LANG=C.UTF-8\n"
    assert [p.name for p in (root / "var" / "cache" / "apt" / "archives").iterdir()] == ["lock"]
    assert (root / "var" / "lib" / "dbus" / "machine-id").exists()  # the VM image's own step


def test_the_vm_image_adds_its_own_steps(tmp_path) -> None:
    root = _tree(tmp_path)
    vmimage._post_install(root)
    assert (root / "etc" / "fstab").read_text().startswith("/dev/vda / ext4 ")
    assert (root / "etc" / "hostname").read_text() == ""
    assert not (root / "var" / "lib" / "dbus" / "machine-id").exists()
    cfg = (root / "etc" / "cloud" / "cloud.cfg.d" / "90-llamavm.cfg").read_text()
    assert "datasource_list: [NoCloud, None]" in cfg
    assert (root / "etc" / "machine-id").read_text() == ""
    assert not list((root / "etc" / "ssh").glob("ssh_host_*"))
