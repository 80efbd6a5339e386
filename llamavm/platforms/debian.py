"""What every Debian tree llamavm builds has in common, whichever tool built it and whatever it
becomes: the test bed's rootfs (debootstrap, a directory that machines are copied from) and the
offline VM image (mmdebstrap, an ext4 disk). Their builds differ (tool, variant, package list,
users, what is configured); their last steps are these."""

from __future__ import annotations

from pathlib import Path


def generalize(root: Path) -> None:
    """The C.UTF-8 locale; no SSH host keys and an empty machine-id (every machine made from the
    tree makes its own); no downloaded .debs in apt's cache."""
    (root / "etc" / "default" / "locale").write_text("LANG=C.UTF-8\n")
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc" / "machine-id").write_text("")
    for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()
