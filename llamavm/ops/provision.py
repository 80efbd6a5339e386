"""`invoke provision`: validate, prepare what hosts need, run the provision playbook, report.

Nothing on a host is touched until the catalog has been validated: a bad catalog stops here
with a one-line error, and the model that serves keeps serving.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamavm import REPO_ROOT
from llamavm.artifacts import contract, hostpkg, source, tinymodel
from llamavm.errors import LlamavmError
from llamavm.inputs import catalog as catalog_mod
from llamavm.inputs import inventory as inventory_mod
from llamavm.inputs import vram
from llamavm.ops import converge
from llamavm.ops.playbook import Recap, run_playbook
from llamavm.platforms import proxmox
from llamavm.platforms.vm import vmbuild

PLAYBOOK = REPO_ROOT / "ansible" / "playbooks" / "provision.yml"
VM_PLAYBOOK = REPO_ROOT / "ansible" / "playbooks" / "vm.yml"
READY_PLAYBOOK = REPO_ROOT / "ansible" / "playbooks" / "vm_ready.yml"


def host_contract(catalog: catalog_mod.Catalog) -> dict[str, Any]:
    """The host contract of `catalog`'s hosts, with each model's VRAM estimate."""
    estimates = {m.name: vram.estimate(catalog, m).as_dict() for m in catalog.models}
    vram.check_companions(catalog, {n: e["total_mib"] for n, e in estimates.items()})
    return contract.build(catalog, estimates)


def default_models(inventory: Path, catalog: catalog_mod.Catalog) -> dict[str, str]:
    """Hosts whose inventory sets llamavm_default_model (host_vars or a group's): host -> the
    catalog name it resolves to. A name or alias the catalog lacks stops here, before any host."""
    from llamavm.ops import remote

    data = remote.inventory_data_cached(inventory)
    chosen = {}
    for host, hv in remote.model_hosts(data, inventory).items():
        wanted = hv.get("llamavm_default_model")
        if wanted is None:
            continue
        try:
            chosen[host] = catalog.resolve(str(wanted)).name
        except LlamavmError:
            names = ", ".join(m.name for m in catalog.models)
            raise LlamavmError(
                f"{inventory}: host {host}: llamavm_default_model: {wanted!r} is not a model of "
                f"{catalog.path} — use one of: {names} (or an alias)",
                code=2,
            ) from None
    return chosen


def provision(
    inventory: str | None,
    catalog_path: str | None,
    *,
    limit: str | None = None,
    check: bool = False,
    full: bool = False,
    say: Callable[[str], None] = print,
    step: Callable[[str, float], None] = lambda name, seconds: None,
) -> Recap:
    """Validate, prepare, converge the inventory's hosts (only what changed); the PLAY RECAP.
    `say` gets the lines for an operator, `step` each step's name and seconds as it ends (the
    test bed and the source overlap: each counts from the start)."""
    inv = inventory_mod.resolve(inventory)
    catalog = catalog_mod.load(catalog_mod.catalog_path(catalog_path, inv.catalog))
    contract.load_host_config()  # a broken config/host.yaml stops here, before any host
    # A host's default model the catalog lacks stops here too, before a test bed or VM is up.
    defaults = default_models(inv.path, catalog)
    # Companions that cannot fit together stop here as well (with the estimates known now; the
    # contract checks again once every model file is there).
    vram.check_companions(catalog, {m.name: vram.estimate(catalog, m).total_mib
                                    for m in catalog.companions})  # fmt: skip
    extra: dict[str, Any] = {}
    local = inv.is_local or inv.uses_testbed
    tiny = local and bool(catalog.settings.controller_share_path)
    share = Path(catalog.settings.controller_share_path or "")
    # Three things at once on a cold machine, each minutes: the test bed's rootfs is built and
    # booted (mostly package downloads and unpacking), the llama.cpp source is fetched and its
    # web UI built (mostly CPU), and as soon as the source's tree is there, the tiny models,
    # the canary, the host contract (every model's GGUF header) and the host package are made.
    began = time.monotonic()
    say("llamavm: preparing the llama.cpp source (cached after the first run)")
    tree: Future[Path] = Future()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="llamavm-prepare") as pool:
        prepared = pool.submit(_prepare_source, tree)
        made = pool.submit(_prepare_inputs, catalog, tree, share if tiny else None)
        if local:
            from llamavm.testbed import machine

            say("llamavm: bringing up the embedded default target (local test bed)")
            info = machine.up()
            step("test bed (rootfs, boot)", time.monotonic() - began)
            say(f"llamavm: test bed up at {info.host_address} (cold build: {info.cold_build})")
        if inv.fleet:
            from llamavm.testbed import fleet as local_fleet

            say(f"llamavm: bringing up {inv.fleet} local fleet hosts on the test bed's LAN")
            for host in local_fleet.up(inv.fleet):
                say(f"llamavm: {host.name} up at {host.address}")
        archive = prepared.result()
        step("llama.cpp source and web UI", time.monotonic() - began)
        inputs = made.result()
        step("tiny models, host contract, host package", time.monotonic() - began)
    extra[source.EXTRA_VAR] = str(archive)
    extra[source.EXTRA_VAR_VERSION] = source.load_config().label
    extra["llama_cpp_canary_model"] = str(inputs.canary)
    if inputs.written is not None:
        say(f"llamavm: {len(inputs.written)} tiny test models in {share}")
    extra["llamavm_contract"] = inputs.contract
    if defaults:
        extra["llamavm_default_models"] = defaults
    if catalog.settings.controller_share_path:
        extra["llamavm_controller_share"] = catalog.settings.controller_share_path
    extra["llamavm_host_package"] = str(inputs.host_package)
    vms = vmbuild.prepare(inventory, say)
    vm_vars = {"llamavm_vms": vms, "llamavm_host_package": extra["llamavm_host_package"]}
    found = _converge_plan(inv.path, extra, vm_vars if vms else None, limit, full, check)
    converge.report(found, say)
    total = Recap(hosts={host: dict(_ZERO) for host in found.up_to_date})
    if found.all_up_to_date:
        return total
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llamavm-observe-") as tmp:
        observe = {"LLAMAVM_OBSERVE": f"{tmp}/vm.json"}
        try:
            if vms:
                say(f"llamavm: building {len(vms)} VM(s) on their hypervisors")
                rc, recap = run_playbook(VM_PLAYBOOK, inv.path, vm_vars, check=check, env=observe)
                if rc != 0:
                    raise LlamavmError(f"ansible-playbook vm.yml failed (exit {rc}) — see above")
                total.merge(recap)
                # Proxmox VE's VMs: through its API once the hosts are prepared for passthrough.
                if any(vm["kind"] == "proxmox" for vm in vms):
                    hosts = proxmox.create_vms(inventory, say, check=check)
                    ready = {"llamavm_ready_hosts": hosts}
                    rc, recap = run_playbook(READY_PLAYBOOK, inv.path, ready, check=check)
                    if rc != 0:
                        raise LlamavmError(
                            f"ansible-playbook vm_ready.yml failed (exit {rc}) — see above"
                        )
                    total.merge(recap)
            observe["LLAMAVM_OBSERVE"] = f"{tmp}/provision.json"
            rc, recap = run_playbook(
                PLAYBOOK,
                inv.path,
                {**extra, "llamavm_skip_roles": found.skip_roles()},
                limit=limit,
                check=check,
                env=observe,
            )
            if rc != 0:
                raise LlamavmError(
                    f"ansible-playbook failed (exit {rc}) — see the task output above"
                )
        except BaseException:
            converge.forget(inv.path, list(found.digests))
            raise
        total.merge(recap)
        if not check:
            observed = _merge_observed(Path(tmp) / "vm.json", Path(tmp) / "provision.json")
            converged = [h for h, c in total.hosts.items() if not c["failed"] + c["unreachable"]]
            for host in converge.record(found, observed, converged):
                say(
                    f"llamavm: {host}: converged, but its record could not be written: the next "
                    "provision converges it in full again"
                )
            for line in converge.repaired_lines(
                found, {h: c["changed"] for h, c in total.hosts.items()}
            ):
                say(line)
    step("converge (llama.cpp build, roles)", time.monotonic() - began)
    return total


_ZERO = {"ok": 0, "changed": 0, "unreachable": 0, "failed": 0}


@dataclass(frozen=True)
class _Inputs:
    """What provision passes the roles besides the source, made beside it."""

    canary: Path
    written: list[Path] | None
    contract: dict[str, Any]
    host_package: Path


def _prepare_source(tree: Future[Path]) -> Path:
    """The llama.cpp source archive; `tree` is resolved as soon as the source is extracted."""
    try:
        tree.set_result(source.fetched_tree())
    except BaseException as exc:
        tree.set_exception(exc)
        raise
    return source.prepare()


def _prepare_inputs(
    catalog: catalog_mod.Catalog, tree: Future[Path], share: Path | None
) -> _Inputs:
    """The canary and the tiny test models (written into `share`, if given: both take their
    vocabularies from the source's tree), then the host contract and the host package."""
    tree.result()
    written = tinymodel.ensure_all(share) if share is not None else None
    return _Inputs(
        canary=tinymodel.canary(),
        written=written,
        contract=host_contract(catalog),
        host_package=hostpkg.build(),
    )


def _converge_plan(
    inventory: Path,
    extra: dict[str, Any],
    vm_vars: dict[str, Any] | None,
    limit: str | None,
    full: bool,
    check: bool,
) -> converge.Plan:
    """Digest the hosts this provision converges and probe them for drift."""
    from llamavm.ops import remote

    data = remote.inventory_data_cached(inventory)
    hostvars = data.get("_meta", {}).get("hostvars", {})
    groups = {g: remote.group_hosts(data, g) for g in data if g != "_meta"}
    wanted = {h for g in _PLAYBOOK_GROUPS for h in groups.get(g, [])}
    if vm_vars:
        wanted |= set(groups.get("llamavm_hypervisors", []))
    if limit:
        wanted &= set(_limited(inventory, limit))
    inputs = {"provision": extra, "vm": vm_vars}
    state_dir = contract.load_host_config().state_dir
    record_path = f"{state_dir}/{converge.RECORD_NAME}"
    return converge.plan(
        inventory,
        inputs,
        {h: hostvars.get(h, {}) for h in sorted(wanted)},
        groups,
        record_path,
        full=full,
        check=check,
    )


#: The groups provision.yml converges.
_PLAYBOOK_GROUPS = ("llama_cpp_builders", "nfs_servers", "llamavm_hosts")


def _limited(inventory: Path, limit: str) -> list[str]:
    """The hosts an Ansible --limit pattern selects (Ansible's own inventory manager)."""
    from llamavm.ops import fleet

    return sorted(fleet.ansible_hosts(inventory, limit))


def _merge_observed(*paths: Path) -> dict[str, Any]:
    merged: dict[str, Any] = {"hosts": {}}
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for host, seen in data.get("hosts", {}).items():
            mine = merged["hosts"].setdefault(
                host, {"files": [], "units": [], "packages": [], "package_roles": {}}
            )
            for key in ("files", "units", "packages"):
                mine[key] += seen.get(key, [])
            for name, roles in (seen.get("package_roles") or {}).items():
                mine["package_roles"][name] = sorted({*mine["package_roles"].get(name, []), *roles})
    return merged


def role_vars(
    inventory: str | None = None, catalog_path: str | None = None, *, vms: bool = False
) -> dict[str, Any]:
    """What `invoke provision` passes the roles (contract, host package, llama.cpp source, canary
    model), for a playbook run without it: the Molecule scenarios of the roles
    (`python -m llamavm.ops.provision vars`). Prepared and cached as provision does; touches no
    host. With `vms`, also the rendered VMs of the inventory (`llamavm_vms`, what vm.yml gets),
    which starts this machine's own hypervisor when a VM runs on it, as provision does."""
    inv = inventory_mod.resolve(inventory)
    catalog = catalog_mod.load(catalog_mod.catalog_path(catalog_path, inv.catalog))
    found: dict[str, Any] = {
        source.EXTRA_VAR: str(source.prepare()),
        source.EXTRA_VAR_VERSION: source.load_config().label,
        "llama_cpp_canary_model": str(tinymodel.canary()),
        "llamavm_contract": host_contract(catalog),
        "llamavm_host_package": str(hostpkg.build()),
    }
    if catalog.settings.controller_share_path:
        found["llamavm_controller_share"] = catalog.settings.controller_share_path
    if vms:
        found["llamavm_vms"] = vmbuild.prepare(inventory, lambda line: print(line, file=sys.stderr))
    return found


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llamavm.ops.provision")
    parser.add_argument("command", choices=["vars"], help="print the roles' inputs as JSON")
    parser.add_argument("--inventory", "-i", default=None)
    parser.add_argument("--catalog", default=None)
    parser.add_argument("--vms", action="store_true", help="with the inventory's rendered VMs")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(role_vars(args.inventory, args.catalog, vms=args.vms)))
    except LlamavmError as exc:
        print(f"llamavm: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def reach_lines(inventory: str | None, catalog_path: str | None) -> list[str]:
    """How to reach what was provisioned."""
    inv = inventory_mod.resolve(inventory)
    catalog = catalog_mod.load(catalog_mod.catalog_path(catalog_path, inv.catalog))
    default = catalog.default
    lines = []
    from llamavm.ops import remote
    from llamavm.testbed import machine

    if inv.is_local:
        host = machine.status()["addresses"]["host"]
        lines += [
            f"web UI and API of {default.name}: http://{host}:{default.port}/ "
            "(on the test bed's LAN; from this machine too)",
            f"  curl http://{host}:{default.port}/v1/models",
            "  invoke status | invoke switch --model NAME | invoke testbed.ssh",
        ]
    else:
        own = default_models(inv.path, catalog)
        for host in remote.hosts(inv.path):
            model = catalog.resolve(own[host.name]) if host.name in own else default
            lines.append(
                f"web UI and API of {model.name} on {host.name}: "
                f"http://{host.address}:{model.port}/"
            )
    addresses = (
        [machine.status()["addresses"]["host"]]
        if inv.is_local
        else [h.address for h in remote.hosts(inv.path)]
    )
    front = catalog.settings.expose.front_door
    if front.enabled:
        port = catalog.settings.reserved_ports["proxy"]
        scheme = "https" if front.tls else "http"
        for address in addresses:
            lines.append(
                f"front door (whichever model serves, through switches): {scheme}://{address}:{port}/"
            )
    control = catalog.settings.control
    if control.enabled:
        for address in addresses:
            lines.append(
                f"model picker and control API: http://{address}:{control.port}/ "
                f"(API docs: /docs"
                + (
                    f"; OpenAI clients that pick the model: http://{address}:{control.port}/v1"
                    if control.routing
                    else ""
                )
                + ")"
            )
    metrics = catalog.settings.expose.metrics
    if metrics:
        port = catalog.settings.reserved_ports["node_exporter"]
        lines.append(f"metrics for Prometheus: node_exporter on port {port} (/metrics)")
    api = catalog.settings.api_key
    if api.policy == "required":
        lines.append(
            f"the API wants a key: 'sudo cat {api.file}' on a host, then send "
            "'Authorization: Bearer KEY' (the web UI asks for it in its settings)"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
