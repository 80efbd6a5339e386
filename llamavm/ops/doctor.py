"""`invoke doctor`: check controller and target prerequisites; OK/WARN/FAIL with the fix."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from llamavm import paths
from llamavm.errors import LlamavmError
from llamavm.inputs import catalog as catalog_mod
from llamavm.inputs import inventory as inventory_mod

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass(frozen=True)
class Check:
    status: str
    name: str
    detail: str
    fix: str = ""


def _bin(name: str) -> str | None:
    """A tool from the venv we run in, else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    minimum = (3, 11)
    if sys.version_info[:2] >= minimum:
        return Check(OK, "python", f"Python {version}")
    return Check(FAIL, "python", f"Python {version}", "use Python 3.11 or newer")


def check_packages() -> list[Check]:
    out = []
    for dist in ("ansible-core", "invoke", "jinja2", "pyyaml", "gguf"):
        try:
            out.append(Check(OK, dist, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            out.append(Check(FAIL, dist, "not installed", "run scripts/bootstrap"))
    return out


def check_tools(names: tuple[str, ...], status_if_missing: str, fix: str) -> list[Check]:
    out = []
    for name in names:
        path = _bin(name)
        if path:
            out.append(Check(OK, name, path))
        else:
            out.append(Check(status_if_missing, name, "not found", fix))
    return out


def check_catalog(explicit: str | None, inv_catalog: str | None) -> Check:
    path = catalog_mod.catalog_path(explicit, inv_catalog)
    try:
        cat = catalog_mod.load(path)
    except LlamavmError as exc:
        return Check(FAIL, "catalog", str(exc), "fix the catalog (see README, 'The catalog')")
    return Check(
        OK, "catalog", f"{path}: {len(cat.models)} models, default {cat.settings.default_model}"
    )


def check_root() -> Check:
    if os.geteuid() == 0:
        return Check(OK, "root", "running as root (needed for the local test bed)")
    return Check(FAIL, "root", "not root", "run the local test bed as root (sudo)")


def check_netns() -> Check:
    ip = shutil.which("ip")
    if not ip or os.geteuid() != 0:
        return Check(
            WARN, "netns", "not checked (needs root and iproute2)", "apt-get install iproute2"
        )
    name = f"llamavm-doctor-{uuid.uuid4().hex[:6]}"
    made = subprocess.run([ip, "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return Check(
            FAIL,
            "netns",
            f"cannot create a network namespace: {made.stderr.strip()}",
            "run on a host (or VM) that allows network namespaces",
        )
    subprocess.run([ip, "netns", "delete", name], capture_output=True)
    return Check(OK, "netns", "network namespaces work")


def check_disk(path: Path, need_gib: float) -> Check:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    if free >= need_gib:
        return Check(OK, "disk", f"{free:.0f} GiB free at {probe}")
    return Check(FAIL, "disk", f"only {free:.1f} GiB free at {probe}", f"free {need_gib:.0f} GiB")


def check_testbed() -> Check:
    try:
        from llamavm.testbed import machine
    except ImportError:
        return Check(WARN, "testbed", "test bed support is not installed yet (issue 3)")
    try:
        state = machine.status()
    except LlamavmError as exc:
        return Check(WARN, "testbed", str(exc), "invoke provision brings it up")
    if state.get("state") == "running":
        host = state.get("addresses", {}).get("host", "?")
        return Check(OK, "testbed", f"running at {host} (pid {state.get('pid')})")
    return Check(
        WARN, "testbed", "not running", "invoke provision (or invoke testbed.up) starts it"
    )


def check_remote(inventory: Path) -> Check:
    ansible = _bin("ansible")
    if not ansible:
        return Check(FAIL, "targets", "ansible not found", "run scripts/bootstrap")
    run = subprocess.run(
        [
            ansible,
            "llamavm_hosts",
            "-i",
            str(inventory),
            "-m",
            "ansible.builtin.ping",
            "-o",
            "-T",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if run.returncode == 0:
        return Check(OK, "targets", "every host answers over SSH")
    failed = [line.split(" ")[0] for line in run.stdout.splitlines() if "SUCCESS" not in line]
    return Check(
        FAIL,
        "targets",
        f"unreachable: {', '.join(failed) or run.stderr.strip()[:200]}",
        "check ansible_host/ansible_user in the inventory and that your SSH key is installed",
    )


def run(inventory: str | None, catalog: str | None) -> list[Check]:
    checks: list[Check] = [check_python(), *check_packages()]
    checks += check_tools(("ansible-playbook",), FAIL, "run scripts/bootstrap")
    checks += check_tools(("ssh", "ssh-keygen"), FAIL, "apt-get install openssh-client")
    try:
        inv = inventory_mod.resolve(inventory)
    except LlamavmError as exc:
        return [*checks, Check(FAIL, "inventory", str(exc), "pass --inventory NAME or PATH")]
    checks.append(Check(OK, "inventory", str(inv.path)))
    checks.append(check_catalog(catalog, inv.catalog))
    checks += check_tools(("npm", "node"), WARN, "apt-get install nodejs npm (builds the web UI)")
    cache = paths.cache()
    if inv.is_local:
        checks += [check_root(), check_netns(), check_disk(cache, 6.0)]
        checks += check_tools(
            ("systemd-nspawn", "debootstrap", "ip"),
            WARN,
            "invoke provision installs it (apt-get install systemd-container debootstrap iproute2)",
        )
        checks.append(check_testbed())
    elif inv.platform == "compose":
        checks += [check_disk(cache, 2.0), check_engine(inv, catalog)]
    else:
        checks += [check_disk(cache, 2.0), check_remote(inv.path)]
    return checks


def check_engine(inv: inventory_mod.Inventory, catalog: str | None) -> Check:
    """A compose host: its settings, the engine's CLI and compose, and the engine answering."""
    from llamavm.inputs import catalog as catalog_mod
    from llamavm.platforms.compose import engine as engine_mod
    from llamavm.platforms.compose import site as site_mod

    try:
        cat = catalog_mod.load(catalog_mod.catalog_path(catalog, inv.catalog))
        engine = engine_mod.Engine(site_mod.site(inv, cat))
        cli = " ".join(engine.compose_cli())
        engine.run([engine.cli, "version", "--format", "{{.Server.Version}}"], timeout=30)
    except LlamavmError as exc:
        return Check(FAIL, "engine", str(exc), "start the engine (dockerd, podman) and check "
                     "llamavm_compose_engine / llamavm_compose_engine_host")  # fmt: skip
    return Check(OK, "engine", f"{engine.cli} answers; compose: {cli}")


def render(checks: list[Check], as_json: bool = False) -> str:
    if as_json:
        return json.dumps([asdict(c) for c in checks], indent=2)
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        line = f"{c.status:<4}  {c.name:<{width}}  {c.detail}"
        if c.fix and c.status != OK:
            line += f"  -> {c.fix}"
        lines.append(line)
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    lines.append(f"\n{len(checks)} checks: {fails} FAIL, {warns} WARN")
    return "\n".join(lines)
