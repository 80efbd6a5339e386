"""llamavm tasks: `invoke --list` shows them; `invoke --help TASK` shows every flag.

tasks.py stays thin: it parses flags and prints; the logic lives in the llamavm package.
"""

from __future__ import annotations

import json as jsonlib
import os
import subprocess
import sys

from invoke import Collection, task
from invoke.exceptions import Exit

from llamavm import REPO_ROOT, models_view
from llamavm import catalog as catalog_mod
from llamavm import doctor as doctor_mod
from llamavm import inventory as inventory_mod
from llamavm.cli import errors_to_exit, not_yet, say

INVENTORY_HELP = "inventory: a folder under inventories/ or a path (default: local, the test bed)"
CATALOG_HELP = (
    "model catalog file (default: the inventory's, else config/models.yaml; "
    f"env {catalog_mod.CATALOG_ENV})"
)


def _catalog(inventory: str | None, catalog: str | None) -> catalog_mod.Catalog:
    inv = inventory_mod.resolve(inventory)
    return catalog_mod.load(catalog_mod.catalog_path(catalog, inv.catalog))


@task(help={"inventory": INVENTORY_HELP, "catalog": CATALOG_HELP, "json": "print JSON"})
@errors_to_exit
def models(c, inventory=None, catalog=None, json=False):
    """List catalog models with their VRAM estimate and whether they fit the budget."""
    cat = _catalog(inventory, catalog)
    say(models_view.as_json(cat) if json else models_view.as_table(cat))


@task(help={"inventory": INVENTORY_HELP, "catalog": CATALOG_HELP, "json": "print JSON"})
@errors_to_exit
def doctor(c, inventory=None, catalog=None, json=False):
    """Check controller and target prerequisites: OK/WARN/FAIL, with the fix for each."""
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
    }
)
@errors_to_exit
def provision(c, inventory=None, catalog=None, limit=None, check=False):
    """Build or converge the target (default: the test bed): base, llama.cpp, model services."""
    _catalog(inventory, catalog)
    raise not_yet("provisioning", 3)


@task(
    help={
        "model": "model name or alias from the catalog",
        "inventory": INVENTORY_HELP,
        "catalog": CATALOG_HELP,
        "host": "the host to switch (default: every host of the inventory)",
        "json": "print the result as JSON",
    }
)
@errors_to_exit
def switch(c, model, inventory=None, catalog=None, host=None, json=False):
    """Swap the served model: health-gated, rolls back to the previous model on failure."""
    _catalog(inventory, catalog).resolve(model)
    raise not_yet("switching models", 5)


@task(help={"inventory": INVENTORY_HELP, "host": "only this host", "dry": "say what would stop"})
@errors_to_exit
def stop(c, inventory=None, host=None, dry=False):
    """Stop the active model on the target hosts."""
    raise not_yet("stopping models", 5)


@task(help={"inventory": INVENTORY_HELP, "host": "only this host", "json": "print JSON"})
@errors_to_exit
def status(c, inventory=None, host=None, json=False):
    """Show per host: active model, URL, health, uptime, load time, GPU memory."""
    raise not_yet("status of model services", 5)


@task(
    help={
        "inventory": INVENTORY_HELP,
        "host": "only this host",
        "lines": "how many past lines to show first",
        "follow": "keep following the journal (default: true)",
    }
)
@errors_to_exit
def logs(c, inventory=None, host=None, lines=100, follow=True):
    """Follow the active model's journal on a host."""
    raise not_yet("model logs", 5)


@task
@errors_to_exit
def lint(c):
    """Run ruff, yamllint and ansible-lint (production profile)."""
    bindir = os.path.dirname(sys.executable)
    steps = [
        [f"{bindir}/ruff", "check", "."],
        [f"{bindir}/ruff", "format", "--check", "."],
        [f"{bindir}/yamllint", "--strict", "."],
        [f"{bindir}/ansible-lint", "--profile", "production", "ansible", "inventories"],
    ]
    failed = []
    for step in steps:
        say(f"$ {' '.join(os.path.basename(step[0]) if i == 0 else a for i, a in enumerate(step))}")
        if subprocess.run(step, cwd=REPO_ROOT).returncode != 0:
            failed.append(os.path.basename(step[0]))
    if failed:
        raise Exit(f"llamavm: lint failed: {', '.join(failed)}", code=1)


@task(
    help={
        "unit": "only the fast unit tests (no test bed, no root)",
        "pytest_args": "extra arguments for pytest, e.g. '-k catalog -x'",
    }
)
@errors_to_exit
def test(c, unit=False, pytest_args=""):
    """Run the linters and the test suite (unit, then integration on the test bed)."""
    lint(c)
    paths = ["tests/unit"] if unit else ["tests"]
    cmd = [sys.executable, "-m", "pytest", *paths, *pytest_args.split()]
    if not unit and os.geteuid() != 0:
        say("llamavm: not root: the test bed tests will be skipped")
    rc = subprocess.run(cmd, cwd=REPO_ROOT).returncode
    if rc != 0:
        raise Exit(f"llamavm: tests failed (pytest exit {rc})", code=rc)


ns = Collection(models, doctor, provision, switch, stop, status, logs, lint, test)
ns.configure({"run": {"echo": False}})
_ = jsonlib  # JSON output is produced by the llamavm modules
