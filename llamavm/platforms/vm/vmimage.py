"""The offline VM image: a Debian 12 root filesystem llamavm builds from packages where no cloud
image can be downloaded, booted kernel-direct (no boot loader, no partition table).

Built once per package list (the cache key), under ${LLAMAVM_CACHE}/vm-images/<name>-<key>/:
`disk.qcow2` (ext4 on the whole disk: cloud-init grows it to the VM's size), `vmlinuz`,
`initrd.img`. Host keys and the machine id are left out: every VM makes its own at first boot.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llamavm import paths, proc
from llamavm.errors import LlamavmError
from llamavm.platforms import debian
from llamavm.platforms.vm import vmspec

#: Bump when the build steps change: part of the cache key.
BUILD_VERSION = 1
STAMP = "COMPLETE"


@dataclass(frozen=True)
class OfflineImage:
    name: str
    key: str
    folder: Path

    @property
    def disk(self) -> Path:
        return self.folder / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        return self.folder / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.folder / "initrd.img"


def _config(name: str) -> dict[str, object]:
    entry = (vmspec.images_file().get("images") or {}).get(name)
    if not isinstance(entry, dict) or entry.get("source") != "offline":
        raise LlamavmError(f"config/images.yaml: {name} is not an offline image")
    return entry


def key_of(name: str) -> str:
    entry = _config(name)
    material = {
        "suite": entry.get("suite"),
        "packages": sorted(entry.get("packages") or []),  # type: ignore[arg-type]
        "build": BUILD_VERSION,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def _post_install(root: Path) -> None:
    (root / "etc" / "fstab").write_text("/dev/vda / ext4 defaults,errors=remount-ro 0 1\n")
    (root / "etc" / "hostname").write_text("")
    (root / "var" / "lib" / "dbus" / "machine-id").unlink(missing_ok=True)
    cfg = root / "etc" / "cloud" / "cloud.cfg.d" / "90-llamavm.cfg"
    cfg.write_text(
        "# llamavm: the seed is a NoCloud volume; don't probe cloud metadata services.\n"
        "datasource_list: [NoCloud, None]\n"
    )
    debian.generalize(root)


def ensure_offline(name: str, cache: Path | None = None, mirror: str | None = None) -> OfflineImage:
    """The built image `name` (building it first when its key is not cached)."""
    entry = _config(name)
    key = key_of(name)
    images = cache / "vm-images" if cache else paths.vm_images()
    image = OfflineImage(name, key, images / f"{name}-{key}")
    if (image.folder / STAMP).is_file():
        return image
    for tool in ("mmdebstrap", "mkfs.ext4", "qemu-img"):
        if shutil.which(tool) is None:
            raise LlamavmError(f"{tool} not found — install mmdebstrap, e2fsprogs and qemu-utils")
    if mirror is None:
        from llamavm.testbed import config as testbed_config

        mirror = testbed_config.resolve_mirror(testbed_config.load_config())
    image.folder.parent.mkdir(parents=True, exist_ok=True)
    staging = image.folder.with_name(image.folder.name + ".build")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    log = staging / "build.log"
    print(f"llamavm: building the {name} VM image ({key}); log: {log}", flush=True)
    try:
        with tempfile.TemporaryDirectory(dir=staging) as tmp:
            tree = Path(tmp) / "root"
            packages = ",".join(entry.get("packages") or [])  # type: ignore[arg-type]
            proc.run(
                ["mmdebstrap", "--variant=apt", f"--include={packages}", str(entry["suite"]),
                 str(tree), mirror],
                "mmdebstrap",
                log=log,
            )  # fmt: skip
            _post_install(tree)
            kernels = sorted((tree / "boot").glob("vmlinuz-*"))
            initrds = sorted((tree / "boot").glob("initrd.img-*"))
            if not kernels or not initrds:
                raise LlamavmError(f"{name}: the image has no kernel or initrd in /boot")
            shutil.copy(kernels[-1], staging / "vmlinuz")
            shutil.copy(initrds[-1], staging / "initrd.img")
            used = int(subprocess.run(
                ["du", "-sm", str(tree)], capture_output=True, text=True, check=True
            ).stdout.split()[0])  # fmt: skip
            raw = Path(tmp) / "disk.raw"
            size = max(2048, used * 2)
            proc.run(
                ["mkfs.ext4", "-q", "-L", "llamavm-root", "-d", str(tree), str(raw), f"{size}M"],
                "mkfs.ext4",
                log=log,
            )
            proc.run(
                ["qemu-img", "convert", "-O", "qcow2", str(raw), str(staging / "disk.qcow2")],
                "qemu-img convert",
                log=log,
            )
        (staging / STAMP).write_text(json.dumps({"key": key, "name": name}) + "\n")
        shutil.rmtree(image.folder, ignore_errors=True)
        staging.rename(image.folder)
    except BaseException:
        shutil.rmtree(staging / "root", ignore_errors=True)
        raise
    return image
