"""llamavm tasks: `invoke --list` shows them; `invoke --help TASK` shows every flag.

tasks.py stays thin: it parses flags and prints; the logic lives in the llamavm package.
What only some tasks need (provisioning, the doctor: Jinja2, cloud-init, Proxmox) is imported in
them, so that a quick `invoke switch` does not pay for it at start-up.
"""

from __future__ import annotations

import json as jsonlib
import os
import subprocess
import sys
import threading
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit

from llamavm import REPO_ROOT, control_api, remote, status_view, switch_view
from llamavm import catalog as catalog_mod
from llamavm import inventory as inventory_mod
from llamavm.cli import errors_to_exit, say
from llamavm.errors import LlamavmError

INVENTORY_HELP = "inventory: a folder under inventories/ or a path (default: local, the test bed)"
CATALOG_HELP = (
    "model catalog file (default: the inventory's, else config/models.yaml; "
    f"env {catalog_mod.CATALOG_ENV})"
)


def _catalog(inventory: str | None, catalog: str | None) -> catalog_mod.Catalog:
    inv = inventory_mod.resolve(inventory)
    return catalog_mod.load(catalog_mod.catalog_path(catalog, inv.catalog))


def _compose(inventory, catalog=None):
    """(catalog, engine, host) of an inventory of kind compose; None for any other kind."""
    inv = inventory_mod.resolve(inventory)
    if inv.platform != "compose":
        return None
    from llamavm import compose

    cat = catalog_mod.load(catalog_mod.catalog_path(catalog, inv.catalog))
    hosts = remote.hosts(inv.path)
    if len(hosts) != 1:
        raise LlamavmError(
            f"{inv.path}: a compose inventory has one host in {remote.GROUP} (the engine's "
            f"machine), not {len(hosts)} — one inventory per engine"
        )
    return cat, compose.Engine(compose.site(inv, cat, hosts[0].address)), hosts[0]


@task(help={"inventory": INVENTORY_HELP, "catalog": CATALOG_HELP, "json": "print JSON"})
@errors_to_exit
def models(c, inventory=None, catalog=None, json=False):
    """List catalog models with their VRAM estimate and whether they fit the budget."""
    from llamavm import models_view  # the VRAM estimates: not every task's start

    cat = _catalog(inventory, catalog)
    say(models_view.as_json(cat) if json else models_view.as_table(cat))


@task(help={"inventory": INVENTORY_HELP, "catalog": CATALOG_HELP, "json": "print JSON"})
@errors_to_exit
def doctor(c, inventory=None, catalog=None, json=False):
    """Check controller and target prerequisites: OK/WARN/FAIL, with the fix for each."""
    from llamavm import doctor as doctor_mod

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
    from llamavm import provision as provision_mod

    on_compose = _compose(inventory, catalog)
    if on_compose:
        from llamavm import compose

        if check or limit or full:
            raise LlamavmError("--check, --limit and --full are for Ansible hosts, not compose")
        cat, engine, target = on_compose
        inv = inventory_mod.resolve(inventory)
        if inv.uses_testbed:
            # Its LAN is the test bed's, its models the tiny stand-ins llamavm writes.
            from llamavm import testbed, tinymodel

            testbed.up()
            if cat.settings.controller_share_path:
                tinymodel.ensure_all(Path(cat.settings.controller_share_path))
        done = compose.provision(cat, engine, say=say)
        say(f"llamavm: {target.name}: " + ("; ".join(done) if done else "up to date, no changes"))
        for name in compose._running(engine.containers()):
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


def _targets(inventory, catalog, host):
    from llamavm import fleet

    inv = inventory_mod.resolve(inventory)
    cat = catalog_mod.load(catalog_mod.catalog_path(catalog, inv.catalog))
    return cat, fleet.pick(inv.path, host)


def _outcome(result):
    """(exit code, answer) of one host's work, or of the exception it raised."""
    if isinstance(result, BaseException):
        # LlamavmError carries exit_code (a host's refusal: 2); invoke's Exit carries code.
        code = getattr(result, "exit_code", None) or getattr(result, "code", None) or 1
        return code, {"ok": False, "code": code, "error": str(result)}
    return result


def _each(targets, work, done, forks, what):
    """fleet.each for a transaction on many hosts; an interrupt says what goes on."""
    from llamavm import fleet

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


HOST_HELP = (
    "the hosts, as an Ansible pattern: a host, a group, gpu-*, a:b, !host (default: every host)"
)
FORKS_HELP = "how many hosts at once (default: 10)"


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
    on_compose = _compose(inventory, catalog)
    if on_compose:
        return _compose_switch(*on_compose, model, inventory=inventory, json=json, dry=dry)
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
    on_compose = _compose(inventory)
    if on_compose:
        from llamavm import compose

        _, engine, target = on_compose
        answer = {"running": compose._running(engine.containers())} if dry else compose.stop(engine)
        if json:
            say(jsonlib.dumps({target.name: answer}, indent=2))
        elif dry:
            say(f"llamavm: {target.name}: would stop {', '.join(answer['running']) or 'nothing'}")
        else:
            say(f"llamavm: {target.name}: stopped {', '.join(answer['stopped']) or 'nothing'}")
        return
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
    from llamavm import fleet

    on_compose = _compose(inventory, catalog)
    if on_compose:
        from llamavm import compose

        cat, engine, target = on_compose
        answer = {**compose.status(cat, engine), "address": target.address}
        results = {target.name: answer}
        say(jsonlib.dumps(results, indent=2) if json else status_view.render(results))
        if len(answer["running"]) > 1:
            raise Exit(code=1)
        return

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
    from llamavm import fleet

    on_compose = _compose(inventory)
    if on_compose:
        from llamavm import compose

        _, engine, _ = on_compose
        running = compose._running(engine.containers())
        if not running:
            raise LlamavmError("no model's container runs — invoke status shows what there is")
        cmd = [engine.cli, "logs", "--tail", str(lines), *(["-f"] if follow else [])]
        raise Exit(code=subprocess.run([*cmd, f"{compose.PROJECT}-{running[0]}"],
                                       env=engine.env).returncode)  # fmt: skip

    _, targets = _targets(inventory, None, host)

    def command(target):
        answer = remote.query(target, ["status"])
        running = answer.get("running", [])
        units = [m["unit"] for m in answer.get("models", []) if m["name"] in running]
        cmd = ["journalctl", "--no-pager", "-n", str(lines)]
        for unit in units or ["llamavm-model-*"]:
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


def _test_tools() -> str:
    """The venv's bin directory, once it holds the test tools (`scripts/bootstrap provision`
    installs only what the other commands need)."""
    bindir = os.path.dirname(sys.executable)
    missing = [t for t in ("pytest", "ruff", "molecule") if not os.path.exists(f"{bindir}/{t}")]
    if missing:
        raise LlamavmError(
            f"{bindir}: no {', '.join(missing)} in this environment — run "
            "./scripts/bootstrap test once: it installs the test tools (pip extra 'test')"
        )
    return bindir


@task
@errors_to_exit
def lint(c):
    """Run ruff, yamllint and ansible-lint (production profile)."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible" / "ansible.cfg")}
    failed = []
    for step in _lint_steps(_test_tools()):
        say(f"$ {_shown(step)}")
        if subprocess.run(step, cwd=REPO_ROOT, env=env).returncode != 0:
            failed.append(os.path.basename(step[0]))
    if failed:
        raise Exit(f"llamavm: lint failed: {', '.join(failed)}", code=1)


def _lint_steps(bindir: str) -> list[list[str]]:
    return [
        [f"{bindir}/ruff", "check", "."],
        [f"{bindir}/ruff", "format", "--check", "."],
        [f"{bindir}/yamllint", "--strict", "."],
        [f"{bindir}/ansible-lint", "--profile", "production", "ansible", "inventories", "molecule"],
    ]


def _shown(argv: list[str]) -> str:
    import shlex

    return shlex.join([os.path.basename(argv[0]), *argv[1:]])


class _Beside:
    """Commands run one after another in a thread, their output kept, while the caller does
    something else (the first provision, mostly downloads, package unpacking and a one-core web
    UI build, leaves a core free): `finish` prints what they said and the names that failed."""

    def __init__(self, steps: list[tuple[str, list[str], dict[str, str]]]) -> None:
        import time

        self.results: list[tuple[str, list[str], int, float, bytes]] = []
        self.stopped = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None

        def work() -> None:
            for name, argv, env in steps:
                if self.stopped.is_set():
                    return
                began = time.monotonic()
                self.proc = subprocess.Popen(
                    argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
                output, _ = self.proc.communicate()
                self.results.append((name, argv, self.proc.returncode, time.monotonic() - began,
                                     output))  # fmt: skip

        self.thread = threading.Thread(target=work, name="llamavm-beside", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """The first provision failed: what still runs beside it is stopped, not left behind."""
        self.stopped.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        self.thread.join(30)

    def finish(self) -> list[str]:
        self.thread.join()
        failed = []
        for name, argv, rc, seconds, output in self.results:
            say(f"$ {_shown(argv)}  ({name}, {seconds:.0f} s, beside the first provision)")
            sys.stdout.flush()
            sys.stdout.buffer.write(output)
            sys.stdout.flush()
            if rc != 0 and not (rc == NO_TESTS and argv[1:3] == ["-m", "pytest"]):
                failed.append(name)
        return failed


#: pytest's exit code when its arguments (-k, -m) leave nothing in a path (the unit tests'
#: run beside the first provision, say): not a failure of that run.
NO_TESTS = 5


#: The Molecule scenarios of the roles that need the embedded VMs (after the others).
MOLECULE_VM_GLOB = "molecule/vm/*/molecule.yml"


@task(
    help={
        "unit": "only the fast unit tests (no test bed, no root)",
        "pytest_args": "extra arguments for pytest, e.g. '-k catalog -x'",
        "molecule": "also run `molecule test` (default: true when the test bed can run)",
        "vm": "also what needs the embedded VMs under TCG: their test suite (marker vm, ~20 "
        "min) and the Molecule scenarios of the roles that run on them (molecule/vm/: the lab "
        "built, converged, verified and powered off, ~11-15 min); not in CI",
        "compose": "also the Compose suite on a real docker engine (marker compose: builds "
        "llama.cpp into an image, ~10 min more)",
    }
)
@errors_to_exit
def test(c, unit=False, pytest_args="", molecule=True, vm=False, compose=False):
    """Run the linters and the test suite: unit, integration on the test bed, Molecule."""
    phases = Phases()
    try:
        _test(c, phases, unit, pytest_args, molecule, vm, compose)
    finally:
        phases.summary()


class Phases:
    """Each phase's wall time, said as it ends and summed up at the end (CI's output shows
    where its minutes go)."""

    def __init__(self) -> None:
        self.done: list[tuple[str, float]] = []

    def run(self, name, work):
        import time

        began = time.monotonic()
        try:
            return work()
        finally:
            self.done.append((name, time.monotonic() - began))
            say(f"llamavm: phase {name}: {self.done[-1][1]:.0f} s")

    def summary(self) -> None:
        if self.done:
            total = sum(s for _, s in self.done)
            parts = ", ".join(f"{n} {s:.0f} s" for n, s in self.done)
            say(f"llamavm: phases ({total / 60:.1f} min): {parts}")


def _test(c, phases, unit, pytest_args, molecule, vm, compose):
    bindir = _test_tools()
    markers = [f"not {m}" for m, on in (("vm", vm), ("compose", compose)) if not on]

    def pytest(*paths: str) -> list[str]:
        cmd = [sys.executable, "-m", "pytest", *paths, *pytest_args.split()]
        return cmd + (["-m", " and ".join(markers)] if markers else [])

    if not unit and os.geteuid() != 0:
        say("llamavm: not root: the test bed tests will be skipped")
    env = dict(os.environ)
    if unit or os.geteuid() != 0:
        phases.run("lint", lambda: lint(c))
        cmd = pytest("tests/unit") if unit else pytest("tests/unit", "tests/integration")
    else:
        # What the integration tests share, built once before them: the test bed (its rootfs),
        # the llama.cpp source with the web UI (the two at once, as `invoke provision` does),
        # and the first provision (the llama.cpp build). The tests' own provision then finds
        # nothing to do.
        from llamavm import provision as provision_mod
        from llamavm import source, testbed

        # First-run paths this run walks itself from empty caches: the tests that walk them
        # again into scratch caches (tests/integration/test_first_run.py) are skipped, saying so.
        cold = {"rootfs": not testbed.rootfs_cached(), "source": source.is_cold()}
        env["LLAMAVM_TEST_WALKED_COLD"] = ",".join(name for name, c in cold.items() if c)
        # The linters and the unit tests need no test bed: they run beside the first provision.
        lint_env = {**env, "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible" / "ansible.cfg")}
        beside = _Beside(
            [("lint", step, lint_env) for step in _lint_steps(bindir)]
            + [("unit tests", pytest("tests/unit"), env)]
        )
        cmd = pytest("tests/integration")
        try:
            phases.run(
                "first provision (test bed, llama.cpp source and web UI, llama.cpp build, roles)",
                lambda: provision_mod.provision(
                    None,
                    None,
                    say=lambda line: None,
                    step=lambda name, secs: say(f"llamavm:   {name}: {secs:.0f} s"),
                ),
            )
        except BaseException:
            beside.stop()
            raise
        failed = phases.run("lint and unit tests (what was left of them)", beside.finish)
        if failed:
            raise Exit(f"llamavm: {' and '.join(dict.fromkeys(failed))} failed — see above", code=1)
    rc = phases.run("pytest", lambda: subprocess.run(cmd, cwd=REPO_ROOT, env=env).returncode)
    if rc != 0:
        raise Exit(f"llamavm: tests failed (pytest exit {rc})", code=rc)
    if unit or not molecule or os.geteuid() != 0:
        return
    # Every role's scenario on the one test bed: molecule/default creates it first and destroys
    # it last (shared_state); the others converge, check idempotence and verify in between.
    say("$ molecule test --all")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("ANSIBLE_CONFIG", None)
    rc = phases.run(
        "molecule",
        lambda: subprocess.run(["molecule", "test", "--all"], cwd=REPO_ROOT, env=env).returncode,
    )
    if rc != 0:
        raise Exit(f"llamavm: molecule test failed (exit {rc})", code=rc)
    if not vm:
        return
    # The roles that need the embedded VMs (hypervisor, libvirt_vms, nfs_server): molecule/vm/,
    # its default scenario brings the lab up first and powers it off at the end. With --vm only:
    # under TCG they alone take a quarter of a cold CI run.
    say(f"$ MOLECULE_GLOB='{MOLECULE_VM_GLOB}' molecule test --all")
    env["MOLECULE_GLOB"] = MOLECULE_VM_GLOB
    rc = phases.run(
        "molecule, VM roles (lab images, VMs)",
        lambda: subprocess.run(["molecule", "test", "--all"], cwd=REPO_ROOT, env=env).returncode,
    )
    if rc != 0:
        raise Exit(f"llamavm: molecule test (VM roles) failed (exit {rc})", code=rc)


@task(name="up")
@errors_to_exit
def testbed_up(c):
    """Build (if needed) and boot the local test bed; wait for SSH."""
    from llamavm import testbed

    info = testbed.up()
    say(f"llamavm: test bed up: {info.host_address} (ssh: {' '.join(info.ssh_command)})")


@task(name="down", help={"purge": "also delete the machine's root filesystem (the cache stays)"})
@errors_to_exit
def testbed_down(c, purge=False):
    """Stop the local test bed and remove its LAN namespaces."""
    from llamavm import testbed

    testbed.down(purge=purge)
    say("llamavm: test bed down")


@task(name="status")
@errors_to_exit
def testbed_status(c):
    """Show the local test bed's state as JSON."""
    from llamavm import testbed

    say(jsonlib.dumps(testbed.status(), indent=2))


@task(name="ssh", help={"command": "run this command instead of an interactive shell"})
@errors_to_exit
def testbed_ssh(c, command=""):
    """SSH into the local test bed as its admin user."""
    from llamavm import testbed

    raise Exit(code=testbed.ssh(command.split() if command else []))


@task(
    name="render",
    help={
        "inventory": INVENTORY_HELP,
        "out": "write each VM's seed (ISO and files) and domain XML here (default: .cache/vm/)",
    },
)
@errors_to_exit
def vm_render(c, inventory=None, out=None):
    """Validate every VM spec of an inventory and render its cloud-init seed and libvirt domain."""
    from llamavm import vmbuild

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
def vm_list(c, inventory=None, json=False):
    """List the inventory's VMs: hypervisor, state, address, whether a restart is pending."""
    from llamavm import vmctl

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


@task(name="console", help={"inventory": INVENTORY_HELP, "vm": "the VM (name or host)"})
@errors_to_exit
def vm_console(c, vm, inventory=None):
    """Attach to a VM's serial console (leave with Ctrl-])."""
    from llamavm import vmctl

    raise Exit(code=vmctl.console(inventory, vm))


@task(
    name="destroy",
    help={
        "inventory": INVENTORY_HELP,
        "vm": "the VM (name or host)",
        "purge": "also delete its disk and seed (the base image stays)",
        "dry": "say what would be done",
    },
)
@errors_to_exit
def vm_destroy(c, vm, inventory=None, purge=False, dry=False):
    """Power a VM off and undefine it (with --purge, delete its disk too)."""
    from llamavm import vmctl

    for line in vmctl.destroy(inventory, vm, purge=purge, dry=dry):
        say(f"llamavm: {line}")


@task(
    name="rotate",
    help={
        "inventory": INVENTORY_HELP,
        "host": "only this host (default: every host of the inventory)",
        "catalog": CATALOG_HELP,
        "show": "print the new key (it is never printed otherwise)",
        "json": "print JSON",
    },
)
@errors_to_exit
def key_rotate(c, inventory=None, catalog=None, host=None, show=False, json=False):
    """Give the hosts a new API key; the serving model restarts with it (front door waits)."""
    cat, targets = _targets(inventory, catalog, host)
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


@task(
    name="build",
    help={
        "inventory": INVENTORY_HELP,
        "host": "only this WSL host of the inventory",
        "out": "write the tarball, user-data and PowerShell script here "
        "(default: /var/cache/llamavm/wsl/<inventory>/)",
    },
)
@errors_to_exit
def wsl_build(c, inventory=None, host=None, out=None):
    """Build each WSL host's distro: rootfs tarball, cloud-init user-data, PowerShell script."""
    from llamavm import wsl

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


def _compose_switch(cat, engine, target, model, *, inventory=None, json=False, dry=False):
    from llamavm import compose, contract

    wanted = cat.resolve(model)
    if dry:
        compose._checks(cat, engine, wanted)
        running = compose._running(engine.containers())
        answer = {"ok": True, "running": running}
    else:
        if not json:
            say(f"llamavm: {target.name}: switching to {wanted.name}")
        timeout = contract.load_host_config().lock_timeout_s
        inv = inventory_mod.resolve(inventory)
        answer = compose.detached_switch(inv.path, cat.path, wanted.name, lock_timeout=timeout)
    if json:
        say(jsonlib.dumps({target.name: answer}, indent=2))
    else:
        say(switch_view.line(target, wanted, 0, answer, dry=dry))


@task(
    name="render",
    help={
        "inventory": INVENTORY_HELP,
        "catalog": CATALOG_HELP,
        "out": "write the project here (default: the inventory's llamavm_compose_dir, else "
        "/var/lib/llamavm/compose/<inventory>/)",
    },
)
@errors_to_exit
def compose_render(c, inventory=None, catalog=None, out=None):
    """Write the catalog as a Compose project: Dockerfile, compose.yaml, entrypoint, source."""
    from llamavm import compose

    inv = inventory_mod.resolve(inventory)
    cat = catalog_mod.load(catalog_mod.catalog_path(catalog, inv.catalog))
    site = compose.site(inv, cat)
    rendered = compose.render(cat, site, Path(out).absolute() if out else None)
    state = f"wrote {', '.join(rendered.changed)}" if rendered.changed else "up to date"
    say(f"llamavm: compose project {rendered.dir}: {state}")
    say(f"llamavm:   image {rendered.image}; services: {', '.join(m.name for m in cat.models)}")
    say(
        f"llamavm:   docker compose -p {compose.PROJECT} --profile {cat.default.name} up -d "
        f"{cat.default.name}   (or: invoke provision -i <an inventory with llamavm_platform: "
        "compose>)"
    )


testbed_ns = Collection("testbed", testbed_up, testbed_down, testbed_status, testbed_ssh)
key_ns = Collection("key", key_rotate)
vm_ns = Collection("vm", vm_render, vm_list, vm_console, vm_destroy)
wsl_ns = Collection("wsl", wsl_build)
compose_ns = Collection("compose", compose_render)
ns = Collection(
    models,
    doctor,
    provision,
    switch,
    stop,
    status,
    logs,
    lint,
    test,
    testbed_ns,
    vm_ns,
    key_ns,
    wsl_ns,
    compose_ns,
)
ns.configure({"run": {"echo": False}})
