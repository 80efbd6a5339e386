"""`invoke lint` and `invoke test`: the linters, then the unit tests, the integration tests on the
test bed (its first provision built while the linters and unit tests run beside it) and Molecule,
each phase's time said."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from invoke import task
from invoke.exceptions import Exit

from llamavm import REPO_ROOT
from llamavm.commands.cli import errors_to_exit, say
from llamavm.errors import LlamavmError


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
        from llamavm.artifacts import source
        from llamavm.ops import provision as provision_mod
        from llamavm.testbed import rootfs

        # First-run paths this run walks itself from empty caches: the tests that walk them
        # again into scratch caches (tests/integration/test_first_run.py) are skipped, saying so.
        cold = {"rootfs": not rootfs.cached(), "source": source.is_cold()}
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
