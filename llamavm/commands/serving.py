"""`invoke switch`, `stop`, `status` and `logs`: on one host or many at once (a line each as it
ends, a failing host failing alone), or on a Compose inventory's project (its switchd
container runs the same `llamavm-switch` as a host's SSH session)."""

from __future__ import annotations

import json as jsonlib
import subprocess
import threading

from invoke import task
from invoke.exceptions import Exit

from llamavm.commands import status_view, switch_view
from llamavm.commands.cli import errors_to_exit, say
from llamavm.commands.targets import CATALOG_HELP, INVENTORY_HELP, compose_engine, pick_hosts
from llamavm.errors import LlamavmError
from llamavm.inputs import catalog as catalog_mod
from llamavm.ops import control_api, remote

HOST_HELP = (
    "the hosts, as an Ansible pattern: a host, a group, gpu-*, a:b, !host (default: every host)"
)
FORKS_HELP = "how many hosts at once (default: 10)"


def _outcome(result):
    """(exit code, answer) of one host's work, or of the exception it raised."""
    if isinstance(result, BaseException):
        # LlamavmError carries exit_code (a host's refusal: 2); invoke's Exit carries code.
        code = getattr(result, "exit_code", None) or getattr(result, "code", None) or 1
        return code, {"ok": False, "code": code, "error": str(result)}
    return result


def _each(targets, work, done, forks, what):
    """fleet.each for a transaction on many hosts; an interrupt says what goes on."""
    from llamavm.ops import fleet

    try:
        return fleet.each(targets, work, done, forks=forks)
    except KeyboardInterrupt:
        if len(targets) == 1:
            raise
        raise LlamavmError(
            f"interrupted here — the {what} goes on on each host that had begun it and "
            "completes or rolls back by itself; 'invoke status' shows how each ended",
            code=130,
        ) from None


def _fail_if_any(outcomes, what):
    """One line for the failures: the host's own reason, or how many of the hosts failed."""
    failed = [(name, code, answer) for name, (code, answer) in outcomes.items() if code]
    if not failed:
        return
    if len(outcomes) == 1:
        name, code, answer = failed[0]
        raise LlamavmError(
            f"{name}: {what} failed: {answer.get('error') or 'no reason given'}",
            code=code,
            detail=answer.get("journal") or "",
        )
    names = ", ".join(f"{name} (exit {code})" for name, code, _ in failed)
    raise LlamavmError(
        f"{what} failed on {len(failed)} of {len(outcomes)} hosts: {names} — the others are "
        "as reported above",
        code=max(code for _, code, _ in failed),
    )


def _targets(inventory, catalog, host):
    """(catalog, hosts) the command works on: the inventory's hosts its pattern picks, or a
    Compose inventory's one host, reached through the project's switchd container."""
    on_compose = compose_engine(inventory, catalog)
    if not on_compose:
        return pick_hosts(inventory, catalog, host)
    from llamavm.platforms.compose import project

    cat, engine, target = on_compose
    return cat, [project.target(engine, target)]


@task(
    help={
        "model": "model name or alias from the catalog",
        "inventory": INVENTORY_HELP,
        "catalog": CATALOG_HELP,
        "host": HOST_HELP,
        "forks": FORKS_HELP,
        "json": "print the result as JSON",
        "dry": "run the pre-switch checks only and say what would change; stop nothing",
    }
)
@errors_to_exit
def switch(c, model, inventory=None, catalog=None, host=None, forks=10, json=False, dry=False):
    """Swap the served model: checked first, health-gated, rolls back on failure."""
    cat, targets = _targets(inventory, catalog, host)
    wanted = cat.resolve(model)
    # One host: its progress streams. Many: they run at once, a line each as it ends.
    stream = len(targets) == 1 and not json

    def work(target):
        if dry:
            answer = remote.query(target, ["check", wanted.name])
            return int(answer.get("code", 0)), answer
        return control_api.transaction(target, cat.settings, "switch", [wanted.name], stream=stream)

    def done(target, result):
        if not json:
            code, answer = _outcome(result)
            say(switch_view.line(target, wanted, code, answer, dry=dry))

    if not json and not dry:
        names = targets[0].name if len(targets) == 1 else f"{len(targets)} hosts"
        say(f"llamavm: {names}: switching to {wanted.name}")
    outcomes = {t.name: _outcome(r) for t, r in _each(targets, work, done, forks, "switch")}
    if json:
        say(jsonlib.dumps({name: answer for name, (_, answer) in outcomes.items()}, indent=2))
    _fail_if_any(outcomes, "switch check" if dry else "switch")


@task(
    help={
        "inventory": INVENTORY_HELP,
        "host": HOST_HELP,
        "forks": FORKS_HELP,
        "dry": "say what would stop",
        "json": "print JSON",
    }
)
@errors_to_exit
def stop(c, inventory=None, host=None, forks=10, dry=False, json=False):
    """Stop the active model on the target hosts."""
    cat, targets = _targets(inventory, None, host)
    stream = len(targets) == 1 and not json

    def work(target):
        if dry:
            return 0, remote.query(target, ["status"])
        return control_api.transaction(target, cat.settings, "stop", [], stream=stream)

    def done(target, result):
        code, answer = _outcome(result)
        if json:
            return
        if code:
            say(f"llamavm: {target.name}: {answer.get('error') or 'failed'}")
        elif dry:
            running = ", ".join(answer.get("running", [])) or "nothing"
            say(f"llamavm: {target.name}: would stop {running}")
        else:
            stopped = ", ".join(answer.get("stopped", [])) or "nothing"
            say(f"llamavm: {target.name}: stopped {stopped}")

    outcomes = {t.name: _outcome(r) for t, r in _each(targets, work, done, forks, "stop")}
    if json and not dry:
        say(jsonlib.dumps({name: answer for name, (_, answer) in outcomes.items()}, indent=2))
    _fail_if_any(outcomes, "stop")


@task(
    help={
        "inventory": INVENTORY_HELP,
        "catalog": CATALOG_HELP,
        "host": HOST_HELP,
        "forks": FORKS_HELP,
        "json": "print JSON",
    }
)
@errors_to_exit
def status(c, inventory=None, catalog=None, host=None, forks=10, json=False):
    """Show per host: active model, URL, health, uptime, load time, GPU memory."""
    from llamavm.ops import fleet

    _, targets = _targets(inventory, catalog, host)
    results = {}
    for target, answer in fleet.each(targets, lambda t: remote.query(t, ["status"]), forks=forks):
        if isinstance(answer, BaseException):
            answer = {"ok": False, "error": str(answer)}
        answer["address"] = target.address
        results[target.name] = answer
    say(jsonlib.dumps(results, indent=2) if json else status_view.render(results))
    if any(not a.get("ok", True) for a in results.values()):
        raise Exit(code=1)


@task(
    help={
        "inventory": INVENTORY_HELP,
        "host": HOST_HELP,
        "lines": "how many past lines to show first",
        "follow": "keep following the journal (default: true; --no-follow prints and exits)",
    }
)
@errors_to_exit
def logs(c, inventory=None, host=None, lines=100, follow=True):
    """Follow the active model's journal on the hosts (each line after its host's name)."""
    from llamavm.ops import fleet

    on_compose = compose_engine(inventory)
    if on_compose:
        from llamavm.platforms.compose import engine as engine_mod
        from llamavm.platforms.compose.render import PROJECT

        _, engine, _ = on_compose
        running = engine_mod.running(engine.containers())
        if not running:
            raise LlamavmError("no model's container runs — invoke status shows what there is")
        cmd = [engine.cli, "logs", "--tail", str(lines), *(["-f"] if follow else [])]
        raise Exit(code=subprocess.run([*cmd, f"{PROJECT}-{running[0]}"],
                                       env=engine.env).returncode)  # fmt: skip

    _, targets = pick_hosts(inventory, None, host)

    def command(target):
        answer = remote.query(target, ["status"])
        running = answer.get("running", [])
        units = [m["unit"] for m in answer.get("models", []) if m["name"] in running]
        cmd = ["journalctl", "--no-pager", "-n", str(lines)]
        for unit in units or [f"{catalog_mod.UNIT_PREFIX}*"]:
            cmd += ["-u", unit]
        if follow:
            cmd.append("-f")
        return target.ssh_command(["sudo", "-n", *cmd], tty=follow and len(targets) == 1)

    commands = fleet.each(targets, command)
    for target, cmd in commands:
        if isinstance(cmd, BaseException):
            raise LlamavmError(f"{target.name}: {cmd}")
    if len(targets) == 1:
        raise Exit(code=subprocess.run(commands[0][1]).returncode)
    procs = [
        (t, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for t, cmd in commands
    ]
    width = max(len(t.name) for t in targets)

    def relay(target, proc):
        for line in proc.stdout:
            say(f"{target.name:<{width}} | {line.rstrip()}")

    threads = [threading.Thread(target=relay, args=pair, daemon=True) for pair in procs]
    for thread in threads:
        thread.start()
    try:
        codes = [proc.wait() for _, proc in procs]
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        for _, proc in procs:
            proc.terminate()
        codes = [0]
    raise Exit(code=max(codes))
