"""`invoke key.*`: the hosts' API key, rotated."""

from __future__ import annotations

import json as jsonlib

from invoke import task

from llamavm.commands.cli import errors_to_exit, say
from llamavm.commands.targets import CATALOG_HELP, INVENTORY_HELP, pick_hosts
from llamavm.errors import LlamavmError
from llamavm.ops import control_api, remote


@task(
    help={
        "inventory": INVENTORY_HELP,
        "host": "only this host (default: every host of the inventory)",
        "catalog": CATALOG_HELP,
        "show": "print the new key (it is never printed otherwise)",
        "json": "print JSON",
    }
)
@errors_to_exit
def rotate(c, inventory=None, catalog=None, host=None, show=False, json=False):
    """Give the hosts a new API key; the serving model restarts with it (front door waits)."""
    cat, targets = pick_hosts(inventory, catalog, host)
    results = {}
    for target in targets:
        code, answer = remote.transaction(target, "rotate-key", [], stream=not json)
        control_api.forget_key(target)
        if code:
            raise LlamavmError(
                f"{target.name}: key rotation failed: {answer.get('error') or 'no reason given'}",
                code=code,
            )
        if show:
            read = remote.run(target, ["cat", cat.settings.api_key.file], stream=False, timeout=60)
            answer["key"] = read.stdout.strip()
        results[target.name] = answer
        if not json:
            restarted = answer.get("restarted")
            where = f": {answer['key']}" if show else f" (sudo cat {cat.settings.api_key.file})"
            say(
                f"llamavm: {target.name}: new API key{where}"
                + (f"; {restarted} restarted with it" if restarted else "")
            )
    if json:
        say(jsonlib.dumps(results, indent=2))
