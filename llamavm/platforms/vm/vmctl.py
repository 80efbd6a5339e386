"""The VMs of an inventory on their hypervisors: list, console, destroy (`invoke vm.*`).

Commands run with virsh on the hypervisor: locally for `localhost` (this machine's embedded
hypervisor), over SSH otherwise, with the connection settings of the inventory.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

from llamavm.errors import LlamavmError
from llamavm.inputs import inventory as inventory_mod
from llamavm.ops import remote
from llamavm.platforms.vm import libvirt_domain, vmbuild, vmspec
from llamavm.platforms.vm.vmspec import VmSpec

URI = "qemu:///system"


@dataclass(frozen=True)
class VmState:
    spec: VmSpec
    state: str
    restart_needed: bool


def _hypervisor_vars(inventory: str | None) -> dict[str, dict[str, Any]]:
    inv = inventory_mod.resolve(inventory)
    return remote.inventory_data(inv.path).get("_meta", {}).get("hostvars", {})


def _run(
    hypervisor: str, hostvars: dict[str, Any], argv: list[str], *, tty: bool = False
) -> subprocess.CompletedProcess[str]:
    if hypervisor == "localhost" or hostvars.get("ansible_connection") == "local":
        return subprocess.run(argv, capture_output=not tty, text=True, check=False)
    host = remote.host_from_vars(hypervisor, hostvars)
    cmd = host.ssh_command(["sudo", "-n", *argv], tty=tty)
    return subprocess.run(cmd, capture_output=not tty, text=True, check=False)


def _find(specs: list[VmSpec], name: str) -> VmSpec:
    for spec in specs:
        if name in (spec.name, spec.host):
            return spec
    known = ", ".join(s.name for s in specs) or "none"
    raise LlamavmError(f"no VM named {name!r} in this inventory — VMs: {known}", code=2)


def list_vms(inventory: str | None) -> list[VmState]:
    specs = vmspec.from_inventory(inventory)
    hostvars = _hypervisor_vars(inventory)
    states = []
    for spec in specs:
        hv = hostvars.get(spec.hypervisor, {})
        run = _run(spec.hypervisor, hv, ["virsh", "-c", URI, "domstate", spec.name])
        state = run.stdout.strip() if run.returncode == 0 else "not defined"
        restart = False
        if state == "running":  # the live definition predates the stored one
            digests = [
                _run(
                    spec.hypervisor,
                    hv,
                    ["virsh", "-c", URI, "metadata", spec.name, libvirt_domain.XMLNS, where],
                ).stdout
                for where in ("--live", "--config")
            ]
            restart = digests[0] != digests[1]
        states.append(VmState(spec, state, restart))
    return states


def console(inventory: str | None, name: str) -> int:
    spec = _find(vmspec.from_inventory(inventory), name)
    hv = _hypervisor_vars(inventory).get(spec.hypervisor, {})
    return _run(
        spec.hypervisor, hv, ["virsh", "-c", URI, "console", spec.name], tty=True
    ).returncode


def destroy(inventory: str | None, name: str, *, purge: bool, dry: bool) -> list[str]:
    """Power the VM off and undefine it; with purge, delete its disk and seed too."""
    spec = _find(vmspec.from_inventory(inventory), name)
    hv = _hypervisor_vars(inventory).get(spec.hypervisor, {})
    where = vmbuild.placement(spec, hv)
    steps = [
        ["virsh", "-c", URI, "destroy", spec.name],
        ["virsh", "-c", URI, "undefine", "--nvram", spec.name],
    ]
    if purge:
        files = [where.disk(spec), where.seed(spec), f"{where.images_dir}/{spec.name}.xml"]
        steps.append(["rm", "-f", *files])
    done = []
    for argv in steps:
        line = " ".join(argv)
        if dry:
            done.append(f"would run on {spec.hypervisor}: {line}")
            continue
        run = _run(spec.hypervisor, hv, argv)
        benign = "not running" in run.stderr or "failed to get domain" in run.stderr
        if run.returncode != 0 and not benign:
            raise LlamavmError(f"{spec.hypervisor}: {line} failed: {run.stderr.strip()[:300]}")
        done.append(f"{spec.hypervisor}: {line}")
    if purge:
        # The VM's host key went with its disk: a VM made again under the same address would
        # otherwise be refused as a man in the middle (after a long wait for SSH).
        for known in known_hosts_files(inventory, spec):
            argv = ["ssh-keygen", "-q", "-R", spec.network.ip, "-f", known]
            if dry:
                done.append(f"would run here: {' '.join(argv)}")
                continue
            subprocess.run(argv, capture_output=True, text=True, check=False)
            done.append(f"here: forgot the host key of {spec.network.ip} in {known}")
    return done


def known_hosts_files(inventory: str | None, spec: VmSpec) -> list[str]:
    """The controller's known_hosts files that the inventory's SSH settings for the VM name."""
    inv = inventory_mod.resolve(inventory)
    files = []
    for host in remote.hosts(inv.path, spec.host):
        words = " ".join(host.ssh_args).replace("=", " ").split()
        files += [words[i + 1] for i, w in enumerate(words[:-1]) if w == "UserKnownHostsFile"]
    return [f for f in files if f.startswith("/")]
