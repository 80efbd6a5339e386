"""`invoke testbed.*`: the local test bed, the embedded default target — up, down, its state,
a shell in it."""

from __future__ import annotations

import json as jsonlib

from invoke import task
from invoke.exceptions import Exit

from llamavm.commands.cli import errors_to_exit, say


@task
@errors_to_exit
def up(c):
    """Build (if needed) and boot the local test bed; wait for SSH."""
    from llamavm.testbed import machine

    info = machine.up()
    say(f"llamavm: test bed up: {info.host_address} (ssh: {' '.join(info.ssh_command)})")


@task(help={"purge": "also delete the machine's root filesystem (the cache stays)"})
@errors_to_exit
def down(c, purge=False):
    """Stop the local test bed and remove its LAN namespaces."""
    from llamavm.testbed import machine

    machine.down(purge=purge)
    say("llamavm: test bed down")


@task
@errors_to_exit
def status(c):
    """Show the local test bed's state as JSON."""
    from llamavm.testbed import machine

    say(jsonlib.dumps(machine.status(), indent=2))


@task(help={"command": "run this command instead of an interactive shell"})
@errors_to_exit
def ssh(c, command=""):
    """SSH into the local test bed as its admin user."""
    from llamavm.testbed import machine

    raise Exit(code=machine.ssh(command.split() if command else []))
