"""`invoke models`, `doctor` and `provision`: what the catalog asks of the hosts, whether the
controller and the target can give it, and making the target so."""

from __future__ import annotations

from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from llamavm.commands.cli import errors_to_exit, say
from llamavm.commands.targets import CATALOG_HELP, INVENTORY_HELP, compose_engine
from llamavm.errors import LlamavmError
from llamavm.inputs import catalog as catalog_mod
from llamavm.inputs import inventory as inventory_mod


def _catalog(inventory: str | None, catalog: str | None) -> catalog_mod.Catalog:
    inv = inventory_mod.resolve(inventory)
    return catalog_mod.load(catalog_mod.catalog_path(catalog, inv.catalog))


@task(help={"inventory": INVENTORY_HELP, "catalog": CATALOG_HELP, "json": "print JSON"})
@errors_to_exit
def models(c, inventory=None, catalog=None, json=False):
    """List catalog models with their VRAM estimate and whether they fit the budget."""
    from llamavm.commands import models_view  # the VRAM estimates: not every task's start

    cat = _catalog(inventory, catalog)
    say(models_view.as_json(cat) if json else models_view.as_table(cat))


@task(help={"inventory": INVENTORY_HELP, "catalog": CATALOG_HELP, "json": "print JSON"})
@errors_to_exit
def doctor(c, inventory=None, catalog=None, json=False):
    """Check controller and target prerequisites: OK/WARN/FAIL, with the fix for each."""
    from llamavm.ops import doctor as doctor_mod

    checks = doctor_mod.run(inventory, catalog)
    say(doctor_mod.render(checks, as_json=json))
    if any(check.status == doctor_mod.FAIL for check in checks):
        raise Exit(code=1)


@task(
    help={
        "inventory": INVENTORY_HELP,
        "catalog": CATALOG_HELP,
        "limit": "only these hosts (Ansible --limit pattern)",
        "check": "dry run: show what would change, change nothing",
        "full": "run every role on every host, even those whose drift probe finds nothing",
    }
)
@errors_to_exit
def provision(c, inventory=None, catalog=None, limit=None, check=False, full=False):
    """Build or converge the target (default: the test bed): base, llama.cpp, model services."""
    from llamavm.ops import provision as provision_mod

    on_compose = compose_engine(inventory, catalog)
    if on_compose:
        from llamavm.platforms.compose import engine as engine_mod
        from llamavm.platforms.compose import project

        if check or limit or full:
            raise LlamavmError("--check, --limit and --full are for Ansible hosts, not compose")
        cat, engine, target = on_compose
        inv = inventory_mod.resolve(inventory)
        if inv.uses_testbed:
            # Its LAN is the test bed's, its models the tiny stand-ins llamavm writes.
            from llamavm.artifacts import tinymodel
            from llamavm.testbed import machine

            machine.up()
            if cat.settings.controller_share_path:
                tinymodel.ensure_all(Path(cat.settings.controller_share_path))
        done = project.provision(cat, engine, target, say=say)
        say(f"llamavm: {target.name}: " + ("; ".join(done) if done else "up to date, no changes"))
        for name in engine_mod.running(engine.containers()):
            model = cat.resolve(name)
            say(f"llamavm: web UI and API of {name}: http://{target.address}:{model.port}/")
        return

    def step(name: str, seconds: float) -> None:
        if seconds >= 30:  # a cold machine's minutes, said; a warm run's seconds, not
            say(f"llamavm: {name}: {seconds:.0f} s")

    recap = provision_mod.provision(
        inventory, catalog, limit=limit, check=check, full=full, say=say, step=step
    )
    if check:
        say(f"llamavm: dry run — {recap.changed or 'no'} changes would be made")
    elif recap.changed == 0:
        say("llamavm: converged — no changes (every host was already as configured)")
    else:
        say(f"llamavm: converged — {recap.changed} changes")
    for line in provision_mod.reach_lines(inventory, catalog):
        say(f"llamavm: {line}")
