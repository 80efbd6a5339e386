"""What the commands share: the --inventory and --catalog help, and what an inventory names —
the hosts a pattern picks, or the Compose engine of an inventory of kind compose."""

from __future__ import annotations

from llamavm.errors import LlamavmError
from llamavm.inputs import catalog as catalog_mod
from llamavm.inputs import inventory as inventory_mod
from llamavm.ops import remote

INVENTORY_HELP = "inventory: a folder under inventories/ or a path (default: local, the test bed)"
CATALOG_HELP = (
    "model catalog file (default: the inventory's, else config/models.yaml; "
    f"env {catalog_mod.CATALOG_ENV})"
)


def compose_engine(inventory, catalog=None):
    """(catalog, engine, host) of an inventory of kind compose; None for any other kind."""
    inv = inventory_mod.resolve(inventory)
    if inv.platform != "compose":
        return None
    from llamavm.platforms.compose import engine as engine_mod
    from llamavm.platforms.compose import site as site_mod

    cat = catalog_mod.load(catalog_mod.catalog_path(catalog, inv.catalog))
    hosts = remote.hosts(inv.path)
    if len(hosts) != 1:
        raise LlamavmError(
            f"{inv.path}: a compose inventory has one host in {remote.GROUP} (the engine's "
            f"machine), not {len(hosts)} — one inventory per engine"
        )
    return cat, engine_mod.Engine(site_mod.site(inv, cat, hosts[0].address)), hosts[0]


def pick_hosts(inventory, catalog, host):
    """(catalog, hosts) of an inventory: the hosts its pattern `host` picks (None: all)."""
    from llamavm.ops import fleet

    inv = inventory_mod.resolve(inventory)
    cat = catalog_mod.load(catalog_mod.catalog_path(catalog, inv.catalog))
    return cat, fleet.pick(inv.path, host)
