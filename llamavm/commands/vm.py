"""`invoke vm.*`: an inventory's VMs — their specs rendered (cloud-init seed, libvirt domain),
listed, their consoles, destroyed."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from llamavm import REPO_ROOT
from llamavm.commands.cli import errors_to_exit, say
from llamavm.commands.targets import INVENTORY_HELP
from llamavm.inputs import inventory as inventory_mod


@task(
    help={
        "inventory": INVENTORY_HELP,
        "out": "write each VM's seed (ISO and files) and domain XML here (default: .cache/vm/)",
    }
)
@errors_to_exit
def render(c, inventory=None, out=None):
    """Validate every VM spec of an inventory and render its cloud-init seed and libvirt domain."""
    from llamavm.platforms.vm import vmbuild

    inv = inventory_mod.resolve(inventory)
    folder = Path(out) if out else REPO_ROOT / ".cache" / "vm" / inv.path.name
    rendered = vmbuild.render_all(inventory, folder)
    if not rendered:
        say(f"llamavm: {inv.path}: no host has a VM spec (llamavm_vm)")
    for item in rendered:
        what = ", ".join(item.changed) if item.changed else "no changes"
        say(
            f"llamavm: {item.spec.host}: VM {item.spec.name} on {item.spec.hypervisor} "
            f"({item.spec.image.name}, cloud-init {item.spec.image.cloud_init}): seed and "
            f"domain valid; {folder / item.spec.name}: {what}"
        )


@task(name="list", help={"inventory": INVENTORY_HELP, "json": "print JSON"})
@errors_to_exit
def list_vms(c, inventory=None, json=False):
    """List the inventory's VMs: hypervisor, state, address, whether a restart is pending."""
    from llamavm.platforms.vm import vmctl

    states = vmctl.list_vms(inventory)
    rows = [
        {
            "vm": s.spec.name,
            "host": s.spec.host,
            "hypervisor": s.spec.hypervisor,
            "state": s.state,
            "address": s.spec.network.ip or f"dhcp ({s.spec.network.mac})",
            "restart_needed": s.restart_needed,
        }
        for s in states
    ]
    if json:
        say(jsonlib.dumps(rows, indent=2))
        return
    say("VM  HOST  HYPERVISOR  STATE  ADDRESS  NOTE")
    for r in rows:
        note = "restart to apply a changed definition" if r["restart_needed"] else ""
        say(f"{r['vm']}  {r['host']}  {r['hypervisor']}  {r['state']}  {r['address']}  {note}")


@task(help={"inventory": INVENTORY_HELP, "vm": "the VM (name or host)"})
@errors_to_exit
def console(c, vm, inventory=None):
    """Attach to a VM's serial console (leave with Ctrl-])."""
    from llamavm.platforms.vm import vmctl

    raise Exit(code=vmctl.console(inventory, vm))


@task(
    help={
        "inventory": INVENTORY_HELP,
        "vm": "the VM (name or host)",
        "purge": "also delete its disk and seed (the base image stays)",
        "dry": "say what would be done",
    }
)
@errors_to_exit
def destroy(c, vm, inventory=None, purge=False, dry=False):
    """Power a VM off and undefine it (with --purge, delete its disk too)."""
    from llamavm.platforms.vm import vmctl

    for line in vmctl.destroy(inventory, vm, purge=purge, dry=dry):
        say(f"llamavm: {line}")
