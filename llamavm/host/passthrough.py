"""llamavm-passthrough: can this hypervisor host pass its GPU through to a VM? Said before
anything is changed, from /sys and /proc alone.

    llamavm-passthrough check --pci 0000:01:00.0 --pci 0000:01:00.1 [--mmio64-mib N] [--json]
    llamavm-passthrough record --pci ADDR... > host.json     what `check` reads, for a bug report
    llamavm-passthrough check --root DIR ...                  check a replayed recording

Checks: the IOMMU is on (and what to set when it is not); every listed function exists; the
GPU's IOMMU group holds only its own functions (bridges aside); which driver holds the card;
its 64-bit BARs fit the guest firmware's 64-bit MMIO window; a card with known reset problems,
or without a reset method, is warned about. Exit 0 when passthrough can work (warnings
allowed), 1 when it cannot, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

OK, WARN, FAIL = "OK", "WARN", "FAIL"
PCI_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]")
#: OVMF's 64-bit PCI MMIO window without X-PciMmio64Mb (edk2 of Debian 12 / Ubuntu 22.04).
DEFAULT_MMIO64_MIB = 32768
#: PCI classes allowed in the GPU's IOMMU group besides its own functions: PCI bridges.
BRIDGE_CLASS = 0x0604
IORESOURCE_MEM_64 = 0x00100000
IORESOURCE_PREFETCH = 0x00002000
#: vendor:device of cards known not to reset cleanly between VM runs (a VM restart may need a
#: host reboot): AMD Polaris, Vega and Navi 10/14 without a vendor-reset module.
RESET_BUGS = {
    "1002:67df": "AMD Radeon RX 470/480/570/580 (Polaris)",
    "1002:687f": "AMD Radeon RX Vega 56/64",
    "1002:66af": "AMD Radeon VII",
    "1002:731f": "AMD Radeon RX 5600/5700 (Navi 10)",
    "1002:7340": "AMD Radeon RX 5500 (Navi 14)",
}


@dataclass(frozen=True)
class Check:
    status: str
    what: str
    detail: str
    fix: str = ""


class Sys:
    """Reads /sys and /proc under `root` (/ on a real host, a recording in tests)."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*[p.lstrip("/") for p in parts])

    def read(self, *parts: str, default: str = "") -> str:
        try:
            return self.path(*parts).read_text().strip()
        except OSError:
            return default

    def link(self, *parts: str) -> str:
        try:
            return os.path.basename(os.readlink(self.path(*parts)))
        except OSError:
            return ""

    def device(self, address: str) -> Path:
        return self.path("sys/bus/pci/devices", address)

    def cpu_vendor(self) -> str:
        for line in self.read("proc/cpuinfo").splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
        return ""


def _hexint(text: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        return -1


def iommu_params(vendor: str) -> list[str]:
    """The kernel parameters that turn the IOMMU on for this CPU vendor."""
    return (
        ["amd_iommu=on", "iommu=pt"] if vendor == "AuthenticAMD" else ["intel_iommu=on", "iommu=pt"]
    )


def bar_mib(sysfs: Sys, address: str) -> int:
    """MiB of 64-bit prefetchable BARs of a function (what the MMIO window must hold)."""
    total = 0
    for line in sysfs.read("sys/bus/pci/devices", address, "resource").splitlines()[:6]:
        fields = line.split()
        if len(fields) != 3:
            continue
        start, end, flags = (_hexint(f) for f in fields)
        if end > start >= 0 and flags & IORESOURCE_MEM_64 and flags & IORESOURCE_PREFETCH:
            total += end - start + 1
    return total // (1024 * 1024)


def check(sysfs: Sys, pci: list[str], mmio64_mib: int | None) -> list[Check]:
    """Every verdict, in order; passthrough can work when none is FAIL."""
    checks: list[Check] = []
    vendor = sysfs.cpu_vendor()
    cmdline = sysfs.read("proc/cmdline").split()
    units = sorted(p.name for p in sysfs.path("sys/class/iommu").glob("*"))
    wanted = iommu_params(vendor)
    if units:
        checks.append(Check(OK, "IOMMU", f"on ({', '.join(units)})"))
        if "iommu=pt" not in cmdline:
            checks.append(
                Check(WARN, "IOMMU mode", "iommu=pt is not set", "add iommu=pt (the host's DMA)")
            )
    else:
        missing = [p for p in wanted if p not in cmdline]
        fix = (
            f"add {' '.join(missing)} to the kernel command line and reboot once (the "
            "hypervisor role does)"
            if missing
            else "turn on VT-d / AMD-Vi (IOMMU) in the firmware setup: the kernel asks already"
        )
        checks.append(Check(FAIL, "IOMMU", "off: no IOMMU units in /sys/class/iommu", fix))
    groups: dict[str, list[str]] = {}
    for address in pci:
        if not sysfs.device(address).exists():
            checks.append(
                Check(FAIL, address, "no such PCI function", "check the address with lspci -D")
            )
            continue
        ident = (
            f"{sysfs.read('sys/bus/pci/devices', address, 'vendor')[2:]}:"
            f"{sysfs.read('sys/bus/pci/devices', address, 'device')[2:]}"
        )
        driver = sysfs.link("sys/bus/pci/devices", address, "driver") or "none"
        if driver in ("vfio-pci", "none"):
            checks.append(Check(OK, address, f"{ident}, driver {driver}"))
        else:
            checks.append(
                Check(
                    WARN,
                    address,
                    f"{ident} is held by the host driver {driver}",
                    "the hypervisor role binds vfio-pci early at boot (a reboot applies it)",
                )
            )
        if ident in RESET_BUGS:
            checks.append(
                Check(
                    WARN,
                    address,
                    f"{RESET_BUGS[ident]} has known reset problems",
                    "restarting the VM may need a host reboot (or the vendor-reset module)",
                )
            )
        elif sysfs.path("sys/bus/pci/devices", address, "reset_method").exists() and not (
            sysfs.read("sys/bus/pci/devices", address, "reset_method")
        ):
            checks.append(
                Check(WARN, address, "has no reset method", "a VM restart may need a host reboot")
            )
        group = sysfs.link("sys/bus/pci/devices", address, "iommu_group")
        if group:
            groups.setdefault(group, []).append(address)
    for group, listed in sorted(groups.items()):
        members = sorted(
            p.name for p in sysfs.path("sys/kernel/iommu_groups", group, "devices").glob("*")
        )
        strangers = []
        for member in members:
            if member in pci:
                continue
            klass = _hexint(sysfs.read("sys/bus/pci/devices", member, "class")) >> 8
            if klass == BRIDGE_CLASS:
                continue
            strangers.append(member)
        if strangers:
            checks.append(
                Check(
                    FAIL,
                    f"IOMMU group {group}",
                    f"{', '.join(listed)} share it with {', '.join(strangers)}",
                    "pass those through too (list them in gpu.pci), or move the card to a "
                    "slot with its own group (see the board manual; ACS)",
                )
            )
        else:
            checks.append(Check(OK, f"IOMMU group {group}", f"only {', '.join(members)}"))
    bars = sum(bar_mib(sysfs, a) for a in pci if sysfs.device(a).exists())
    window = mmio64_mib or DEFAULT_MMIO64_MIB
    if bars:
        needed = 1 << (bars - 1).bit_length()  # BARs are aligned to their (power-of-2) size
        if needed > window:
            checks.append(
                Check(
                    FAIL,
                    "64-bit MMIO",
                    f"the card's 64-bit BARs take {bars} MiB; the guest firmware's window is "
                    f"{window} MiB",
                    f"set llamavm_vm.gpu.mmio64_mib: {needed}",
                )
            )
        else:
            checks.append(Check(OK, "64-bit MMIO", f"BARs {bars} MiB fit the {window} MiB window"))
    return checks


def record(sysfs: Sys, pci: list[str]) -> dict[str, Any]:
    """What `check` reads, as JSON: the devices, their IOMMU groups' members, the IOMMU units."""
    devices: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {}
    for address in pci:
        group = sysfs.link("sys/bus/pci/devices", address, "iommu_group")
        if group:
            groups[group] = sorted(
                p.name for p in sysfs.path("sys/kernel/iommu_groups", group, "devices").glob("*")
            )
    for address in sorted({*pci, *[m for ms in groups.values() for m in ms]}):
        base = ("sys/bus/pci/devices", address)
        devices[address] = {
            "vendor": sysfs.read(*base, "vendor"),
            "device": sysfs.read(*base, "device"),
            "class": sysfs.read(*base, "class"),
            "driver": sysfs.link(*base, "driver") or None,
            "iommu_group": sysfs.link(*base, "iommu_group") or None,
            "resource": sysfs.read(*base, "resource"),
            "reset_method": (
                sysfs.read(*base, "reset_method")
                if sysfs.path(*base, "reset_method").exists()
                else None
            ),
        }
    return {
        "cmdline": sysfs.read("proc/cmdline"),
        "cpu_vendor": sysfs.cpu_vendor(),
        "iommu_units": sorted(p.name for p in sysfs.path("sys/class/iommu").glob("*")),
        "devices": devices,
    }


def replay(recording: dict[str, Any], root: Path) -> Sys:
    """Write a recording back as a /sys + /proc tree under `root`."""
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "cmdline").write_text(recording["cmdline"] + "\n")
    (root / "proc" / "cpuinfo").write_text(f"vendor_id\t: {recording['cpu_vendor']}\n")
    (root / "sys" / "class" / "iommu").mkdir(parents=True, exist_ok=True)
    for unit in recording["iommu_units"]:
        (root / "sys" / "class" / "iommu" / unit).mkdir()
    for address, dev in recording["devices"].items():
        folder = root / "sys" / "bus" / "pci" / "devices" / address
        folder.mkdir(parents=True)
        for key in ("vendor", "device", "class", "resource"):
            (folder / key).write_text(f"{dev[key]}\n")
        if dev.get("reset_method") is not None:
            (folder / "reset_method").write_text(f"{dev['reset_method']}\n")
        if dev.get("driver"):
            (folder / "driver").symlink_to(f"../../../bus/pci/drivers/{dev['driver']}")
        if dev.get("iommu_group"):
            group = root / "sys" / "kernel" / "iommu_groups" / dev["iommu_group"] / "devices"
            group.mkdir(parents=True, exist_ok=True)
            (group / address).symlink_to(f"../../../../bus/pci/devices/{address}")
            (folder / "iommu_group").symlink_to(
                f"../../../kernel/iommu_groups/{dev['iommu_group']}"
            )
    return Sys(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamavm-passthrough", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("check", "record"):
        p = sub.add_parser(name)
        p.add_argument("--pci", action="append", required=True, help="a function of the GPU")
        p.add_argument("--root", default="/", help="read /sys and /proc under this folder")
        if name == "check":
            p.add_argument("--mmio64-mib", type=int, default=None)
            p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    bad = [a for a in args.pci if not PCI_RE.fullmatch(a)]
    if bad:
        print(
            f"llamavm-passthrough: {bad[0]!r} is not a PCI address (0000:01:00.0)", file=sys.stderr
        )
        return 2
    sysfs = Sys(Path(args.root))
    if args.command == "record":
        print(json.dumps(record(sysfs, args.pci), indent=2, sort_keys=True))
        return 0
    checks = check(sysfs, args.pci, args.mmio64_mib)
    possible = all(c.status != FAIL for c in checks)
    if args.json:
        print(json.dumps({"possible": possible, "checks": [asdict(c) for c in checks]}))
    else:
        for c in checks:
            print(f"{c.status:4}  {c.what}: {c.detail}" + (f" — {c.fix}" if c.fix else ""))
        print("passthrough can work" if possible else "passthrough cannot work yet")
    return 0 if possible else 1
