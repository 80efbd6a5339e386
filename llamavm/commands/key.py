"""`invoke key.*`: the hosts' API key, rotated."""

from __future__ import annotations

import json as jsonlib

from invoke import task

from llamavm.commands.cli import errors_to_exit, say
from llamavm.commands.targets import CATALOG_HELP, INVENTORY_HELP, compose_engine, pick_hosts
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
    on_compose = compose_engine(inventory, catalog)
    if on_compose:  # the transaction runs in the project's switchd container
        from llamavm.platforms.compose import project

        cat, engine, compose_host = on_compose
        targets = [project.target(engine, compose_host)]
        shown_file = str(engine.dir / "secrets" / "api-key")
    else:
        cat, targets = pick_hosts(inventory, catalog, host)
        shown_file = cat.settings.api_key.file
    results = {}
    for target in targets:
        code, answer = remote.transaction(target, "rotate-key", [], stream=not json)
        control_api.forget_key(target)
        if code:
            raise LlamavmError(
                f"{target.name}: key rotation failed: {answer.get('error') or 'no reason given'}",
                code=code,
            )
        if on_compose:
            project.restart_control(engine, cat)
        if show:
            key_file = target.key_file or cat.settings.api_key.file
            read = remote.run(target, ["cat", key_file], stream=False, timeout=60)
            answer["key"] = read.stdout.strip()
        results[target.name] = answer
        if not json:
            restarted = answer.get("restarted")
            where = f": {answer['key']}" if show else f" (sudo cat {shown_file})"
            say(
                f"llamavm: {target.name}: new API key{where}"
                + (f"; {restarted} restarted with it" if restarted else "")
            )
    if json:
        say(jsonlib.dumps(results, indent=2))
