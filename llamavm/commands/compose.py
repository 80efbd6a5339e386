"""`invoke compose.*`: the catalog written as a Compose project."""

from __future__ import annotations

from pathlib import Path

from invoke import task

from llamavm import paths
from llamavm.commands.cli import errors_to_exit, say
from llamavm.commands.targets import CATALOG_HELP, INVENTORY_HELP
from llamavm.inputs import catalog as catalog_mod
from llamavm.inputs import inventory as inventory_mod


@task(
    help={
        "inventory": INVENTORY_HELP,
        "catalog": CATALOG_HELP,
        "out": "write the project here (default: the inventory's llamavm_compose_dir, else "
        f"{paths.DEFAULT_STATE}/compose/<inventory>/)",
    }
)
@errors_to_exit
def render(c, inventory=None, catalog=None, out=None):
    """Write the catalog as a Compose project: Dockerfile, compose.yaml, entrypoint, source."""
    from llamavm.platforms.compose import render as render_mod
    from llamavm.platforms.compose import site as site_mod

    inv = inventory_mod.resolve(inventory)
    cat = catalog_mod.load(catalog_mod.catalog_path(catalog, inv.catalog))
    site = site_mod.site(inv, cat)
    rendered = render_mod.render(cat, site, Path(out).absolute() if out else None)
    state = f"wrote {', '.join(rendered.changed)}" if rendered.changed else "up to date"
    say(f"llamavm: compose project {rendered.dir}: {state}")
    say(f"llamavm:   image {rendered.image}; services: {', '.join(m.name for m in cat.models)}")
    say(
        f"llamavm:   docker compose -p {render_mod.PROJECT} --profile {cat.default.name} up -d "
        f"{cat.default.name}   (or: invoke provision -i <an inventory with llamavm_platform: "
        "compose>)"
    )
