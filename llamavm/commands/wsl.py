"""`invoke wsl.*`: each WSL host's distro, built for its Windows PC."""

from __future__ import annotations

from pathlib import Path

from invoke import task

from llamavm import paths
from llamavm.commands.cli import errors_to_exit, say
from llamavm.commands.targets import INVENTORY_HELP
from llamavm.inputs import inventory as inventory_mod


@task(
    help={
        "inventory": INVENTORY_HELP,
        "host": "only this WSL host of the inventory",
        "out": "write the tarball, user-data and PowerShell script here "
        f"(default: {paths.DEFAULT_CACHE}/wsl/<inventory>/)",
    }
)
@errors_to_exit
def build(c, inventory=None, host=None, out=None):
    """Build each WSL host's distro: rootfs tarball, cloud-init user-data, PowerShell script."""
    from llamavm.platforms import wsl

    inv = inventory_mod.resolve(inventory)
    folder = Path(out) if out else wsl.build_dir(inv)
    for spec in wsl.from_inventory(inventory, host):
        built = wsl.build(spec, folder)
        state = "built" if built.rebuilt else "up to date"
        say(f"llamavm: {spec.host}: WSL distro {spec.name} ({spec.image.name}) {state}:")
        for path in (built.tarball, *built.files.values()):
            say(f"llamavm:   {path}")
        say(
            f"llamavm: on the Windows PC, in an elevated PowerShell next to these files: "
            f"powershell -ExecutionPolicy Bypass -File .\\install-{spec.name}.ps1"
        )
