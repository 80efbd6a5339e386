"""Skip a converge that would change nothing: a digest per host, a drift probe, a record.

`invoke provision` computes, per host, the digest of everything that shapes its converge: the
ansible/ tree (roles, playbooks, plugins, ansible.cfg), the playbooks' inputs (the host contract,
the host package, the llama.cpp source, the canary model, the VM specs — files by their content),
the host's own inventory variables, the Ansible version and ANSIBLE_* settings. After a converge
that succeeded, each host keeps a record (ansible/library/llamavm_converge.py): that digest and a
snapshot of what the roles manage there, as the llamavm_observe callback saw them do it (the
files they wrote, the units they enabled or started, the packages they installed), with the
host's fingerprint (OS, kernel, CPU flags, machine id, a GPU driver) and `llamavm-switch drift`
(would `apply` install, restart or start anything?).

The next provision asks each host — one module run, no facts — whether its record has the same
digest and its snapshot still holds. Hosts that say yes are up to date and the roles' hundred
module runs are skipped; drift (a hand-edited unit, a deleted file, a stopped service, a removed
package) runs the roles that manage what drifted and those that build on them (every role when
the host itself changed: a new GPU, kernel or OS), says what it found, and records again.

The digest is made of one per role of provision.yml (its own files, the playbook inputs it reads,
see ROLES) and the rest (the playbooks, plugins, the host's variables, Ansible). When only some
roles' digests changed — a model added to the catalog changes what model_services, expose and
control read, not what base, gpu or llama_cpp read — and the host's probe against its last
digest finds no drift, only those roles and the roles that build on them run
(`llamavm_skip_roles`); the record keeps what the skipped roles manage (each item names the
roles that manage it). The controller remembers which digests it recorded per host
(`$LLAMAVM_STATE/converge/`): to skip probing a host it certainly has to converge, and to know
which roles changed. To see why a digest changed, set LLAMAVM_DIGEST_DUMP=FILE: provision
writes what went into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamavm import REPO_ROOT, paths
from llamavm.ops import playbook

PLAYBOOK = REPO_ROOT / "ansible" / "playbooks" / "converge.yml"
ANSIBLE_TREE = REPO_ROOT / "ansible"
#: The record's name in the host's state directory (config/host.yaml paths.state_dir).
RECORD_NAME = "converge.json"
#: The inventory group whose hosts run the host package (its drift hook).
MODEL_HOSTS = "llamavm_hosts"
#: How many drift lines per host provision prints (the rest are counted).
SHOWN = 8


@dataclass(frozen=True)
class Role:
    """A role of provision.yml: the roles it builds on (it runs again whenever one of them runs)
    and the playbook inputs it reads: extra variables by name, `llamavm_contract.KEY` for one
    key of the host contract. Extra variables named after a role (`llama_cpp_*`) are that
    role's; any other input counts for every role. tests/unit/ops/test_converge.py holds this
    against the playbook's own role variables."""

    after: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()


#: provision.yml's roles, in the order they run.
ROLES: dict[str, Role] = {
    "base": Role(),
    "gpu": Role(after=("base",), reads=("llamavm_contract.install",)),
    "model_share": Role(
        after=("base",),
        reads=(
            "llamavm_contract.share_path",
            "llamavm_contract.models",
            "llamavm_contract.companions",
            "llamavm_controller_share",
        ),
    ),
    "nfs_server": Role(after=("model_share",)),
    "llama_cpp": Role(after=("base", "gpu"), reads=("llamavm_contract.install",)),
    "model_services": Role(
        after=("base", "gpu", "model_share", "llama_cpp"),
        reads=("llamavm_contract", "llamavm_default_models", "llamavm_host_package"),
    ),
    "expose": Role(
        after=("base", "model_services"),
        reads=(
            "llamavm_contract.firewall",
            "llamavm_contract.front_door",
            "llamavm_contract.metrics",
            "llamavm_contract.paths",
        ),
    ),
    # The control service re-reads the models from the contract file; it restarts when its own
    # settings or the host package it runs change.
    "control": Role(
        after=("base",),
        reads=(
            "llamavm_contract.control",
            "llamavm_contract.api_key",
            "llamavm_contract.paths",
            "llamavm_contract.install",
            "llamavm_host_package",
        ),
    ),
}


def to_run(changed: set[str]) -> list[str]:
    """The roles that run when `changed` did: those and every role that builds on one that
    runs, in provision.yml's order."""
    run = set(changed)
    for name, role in ROLES.items():  # in order: a role's `after` come before it
        if run.intersection(role.after):
            run.add(name)
    return [name for name in ROLES if name in run]


def state_dir() -> Path:
    return paths.converged()


def _file_digests() -> Path:
    return paths.file_digests()


class _Digests:
    """sha256 of files, kept across runs by (path, size, mtime, inode): a 100 MB archive is
    read once, not on every provision."""

    def __init__(self) -> None:
        self.path = _file_digests()
        try:
            self.known: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.dirty = False

    def file(self, path: Path, st: os.stat_result) -> str:
        key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
        found = self.known.get(key)
        if found is None:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            found = self.known[key] = digest.hexdigest()
            self.dirty = True
        return found

    def save(self) -> None:
        if not self.dirty:
            return
        live = {k: v for k, v in self.known.items() if Path(k.split("\0", 1)[0]).exists()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(live))
            os.replace(tmp, self.path)
        except OSError:
            pass


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".cache"))
        for name in sorted(files):
            if not name.endswith((".pyc", ".retry")):
                yield Path(folder) / name


def tree_digest(root: Path = ANSIBLE_TREE, skip: tuple[Path, ...] = ()) -> str:
    """Every file under `root` by path and content (but those under `skip`)."""
    digest = hashlib.sha256()
    for path in _walk(root):
        if any(path.is_relative_to(s) for s in skip):
            continue
        data = path.read_bytes()
        digest.update(f"{path.relative_to(root)}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def _role_inputs(extra: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Split provision.yml's (normalized) extra variables: per role what it reads, and what no
    role claims (it counts for every role)."""
    own: dict[str, dict[str, Any]] = {name: {} for name in ROLES}
    claimed: set[str] = set()
    for name, role in ROLES.items():
        for item in role.reads:
            var, _, key = item.partition(".")
            if var not in extra:
                continue
            claimed.add(var)
            own[name][item] = (
                extra[var].get(key) if key and isinstance(extra[var], dict) else extra[var]
            )
    for var, value in extra.items():
        owner = next((n for n in ROLES if var.startswith(f"{n}_")), None)
        if owner:
            own[owner][var] = value
            claimed.add(var)
    return own, {k: v for k, v in extra.items() if k not in claimed}


def normalize(value: Any, files: _Digests, depth: int = 0) -> Any:
    """`value` with each absolute path of an existing file replaced by its content digest, and
    a playbook variable that names a directory (llamavm_controller_share) by its
    listing (names, sizes, mtimes): what a role reads from there. Deeper directory paths are
    the hosts' own (the contract's state_dir), not the controller's: left as they are."""
    if isinstance(value, dict):
        return {str(k): normalize(v, files, depth + 1) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [normalize(v, files, depth + 1) for v in value]
    if isinstance(value, str) and value.startswith("/") and "\n" not in value:
        path = Path(value)
        try:
            st = path.stat()
        except OSError:
            return value
        if stat.S_ISREG(st.st_mode):
            return f"{value}@sha256:{files.file(path, st)}"
        if stat.S_ISDIR(st.st_mode) and depth == 2 and not path.is_relative_to(REPO_ROOT):
            listing = hashlib.sha256()
            for item in _walk(path):
                try:
                    ist = item.stat()
                except OSError:
                    continue
                listing.update(f"{item}\0{ist.st_size}\0{ist.st_mtime_ns}\n".encode())
            return f"{value}@listing:{listing.hexdigest()}"
    return value


def _ansible_version() -> str:
    try:
        from ansible.release import __version__
    except ImportError:  # pragma: no cover - ansible-core is a dependency
        return "unknown"
    return str(__version__)


@dataclass(frozen=True)
class Digest:
    """A host's converge digest, the part of it that is each role's, and the rest's."""

    digest: str
    roles: dict[str, str]
    rest: str


#: Paths in a VM's entry (vm.yml's llamavm_vms) that name what the hypervisor makes — the
#: VM's own disk, its seed and base image there — not inputs: on a hypervisor that is this
#: machine they exist here and change as the VM runs, so they count by name, not by content.
VM_OUTPUTS = ("disk", "seed", "base_disk")


def _vm_outputs(inputs: dict[str, Any]) -> dict[str, Any]:
    vm = inputs.get("vm")
    if not isinstance(vm, dict) or not isinstance(vm.get("llamavm_vms"), list):
        return inputs
    vms = []
    for entry in vm["llamavm_vms"]:
        entry = dict(entry)
        for key in VM_OUTPUTS:
            if isinstance(entry.get(key), str):
                entry[key] = f"hypervisor:{entry[key]}"
        entry["offline_files"] = [
            {**item, "dest": f"hypervisor:{item.get('dest')}"}
            for item in entry.get("offline_files") or []
        ]
        vms.append(entry)
    return {**inputs, "vm": {**vm, "llamavm_vms": vms}}


def host_digests(inputs: dict[str, Any], hostvars: dict[str, dict[str, Any]]) -> dict[str, Digest]:
    """Per host, the digest of everything that shapes its converge, split by role."""
    files = _Digests()
    normalized = normalize(_vm_outputs(inputs), files)
    files.save()
    roles_dir = ANSIBLE_TREE / "roles"
    own, unclaimed = _role_inputs(normalized.get("provision") or {})
    roles = {
        name: hashlib.sha256(
            json.dumps(
                {"tree": tree_digest(roles_dir / name), "inputs": own[name]},
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()
        for name in ROLES
    }
    shared = {
        "tree": tree_digest(skip=tuple(roles_dir / name for name in ROLES)),
        "inputs": {**normalized, "provision": unclaimed},
        "ansible": _ansible_version(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("ANSIBLE_")},
    }
    base = json.dumps(shared, sort_keys=True, default=str)
    if os.environ.get("LLAMAVM_DIGEST_DUMP"):  # what went into it, to see why it changed
        Path(os.environ["LLAMAVM_DIGEST_DUMP"]).write_text(
            json.dumps({"shared": shared, "roles": own, "role_digests": roles}, default=str)
        )
    by_role = json.dumps(roles, sort_keys=True)
    found = {}
    for host, hv in sorted(hostvars.items()):
        rest = hashlib.sha256(
            f"{base}\0{host}\0{json.dumps(hv, sort_keys=True, default=str)}".encode()
        ).hexdigest()
        digest = hashlib.sha256(f"{rest}\0{by_role}".encode()).hexdigest()
        found[host] = Digest(digest, dict(roles), rest)
    return found


def digests(inputs: dict[str, Any], hostvars: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Per host, the digest of everything that shapes its converge."""
    return {host: d.digest for host, d in host_digests(inputs, hostvars).items()}


@dataclass
class Plan:
    """What provision found before it ran the roles."""

    inventory: Path
    digests: dict[str, str]
    record_path: str
    hooks: dict[str, list[list[str]]] = field(default_factory=dict)
    drift: dict[str, list[str]] = field(default_factory=dict)
    up_to_date: dict[str, int] = field(default_factory=dict)  # host -> items checked
    #: Hosts that converge only some roles (no drift; only those roles' inputs changed).
    partial: dict[str, list[str]] = field(default_factory=dict)
    split: dict[str, Digest] = field(default_factory=dict)

    @property
    def all_up_to_date(self) -> bool:
        return bool(self.digests) and set(self.up_to_date) == set(self.digests)

    def skip_roles(self) -> dict[str, list[str]]:
        """provision.yml's llamavm_skip_roles: every role on hosts up to date, the unchanged
        ones on hosts that converge in part."""
        skip = {host: list(ROLES) for host in self.up_to_date}
        for host, run in self.partial.items():
            skip[host] = [name for name in ROLES if name not in run]
        return skip


def _note_path(inventory: Path) -> Path:
    key = hashlib.sha256(str(inventory.resolve()).encode()).hexdigest()[:24]
    return state_dir() / f"{key}.json"


def _notes(inventory: Path) -> dict[str, Any]:
    """Per host the digest this controller last recorded there: {digest, roles, rest} (a bare
    digest from before per-role converges)."""
    try:
        data = json.loads(_note_path(inventory).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _noted(note: Any) -> tuple[str | None, dict[str, str], str | None]:
    if isinstance(note, str):
        return note, {}, None
    if isinstance(note, dict) and isinstance(note.get("digest"), str):
        roles = note.get("roles") if isinstance(note.get("roles"), dict) else {}
        rest = note.get("rest") if isinstance(note.get("rest"), str) else None
        return note["digest"], roles, rest
    return None, {}, None


def _save_notes(inventory: Path, notes: dict[str, Any]) -> None:
    path = _note_path(inventory)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(notes, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def run_converge_play(
    inventory: Path,
    per_host: dict[str, dict[str, Any]],
    *,
    check: bool = False,
) -> tuple[int, dict[str, Any], str]:
    """converge.yml with `llamavm_converge` = per_host; (exit code, observed, output)."""
    with tempfile.TemporaryDirectory(prefix="llamavm-converge-") as tmp:
        observed = Path(tmp) / "observed.json"
        lines: list[str] = []
        rc, _ = playbook.run_playbook(
            PLAYBOOK,
            inventory,
            {"llamavm_converge": per_host},
            limit=",".join(sorted(per_host)),
            check=check,
            echo=lines.append,
            env={"LLAMAVM_OBSERVE": str(observed)},
        )
        try:
            found = json.loads(observed.read_text())
        except (OSError, ValueError):
            found = {}
    return rc, found, "".join(lines)


def plan(
    inventory: Path,
    inputs: dict[str, Any],
    hostvars: dict[str, dict[str, Any]],
    groups: dict[str, list[str]],
    record_path: str,
    *,
    full: bool = False,
    check: bool = False,
) -> Plan:
    """Digest every host, then probe those whose last record this controller made has the
    same digest — or differs only in some roles' part (then, without drift, only those roles
    and the ones that build on them converge). `full`: probe nothing (every host converges)."""
    split = host_digests(inputs, hostvars)
    found = Plan(inventory, {h: d.digest for h, d in split.items()}, record_path, split=split)
    found.hooks = {h: hooks_for(h, groups, inputs) for h in found.digests}
    notes = _notes(inventory)
    probe: dict[str, dict[str, Any]] = {}
    changed: dict[str, list[str]] = {}
    for host, now in split.items():
        digest, roles, rest = _noted(notes.get(host))
        if full:
            found.drift[host] = ["a full converge was asked for (--full)"]
        elif digest is None:
            found.drift[host] = ["no converge of it recorded by this controller"]
        elif digest == now.digest:
            probe[host] = {"state": "verify", "digest": digest, "path": record_path}
        elif rest == now.rest and set(roles) == set(now.roles):
            # Probe against the digest it was converged with: no drift, then only these roles.
            changed[host] = [n for n in ROLES if roles.get(n) != now.roles.get(n)]
            probe[host] = {"state": "verify", "digest": digest, "path": record_path}
        else:
            found.drift[host] = ["what shapes its converge changed since the last one"]
    if probe:
        _, observed, _ = run_converge_play(inventory, probe, check=check)
        answers = observed.get("probe", {})
        for host in probe:
            answer = answers.get(host)
            if not isinstance(answer, dict) or not isinstance(answer.get("drift"), list):
                found.drift[host] = ["the drift probe could not ask it (unreachable or failed)"]
            elif answer["drift"]:
                found.drift[host] = [str(item) for item in answer["drift"]]
                # What drifted is some roles' alone: those run, with what changed.
                theirs = answer.get("roles")
                if isinstance(theirs, list) and set(theirs) <= set(ROLES):
                    found.partial[host] = to_run(set(theirs) | set(changed.get(host, [])))
            elif host in changed and not answer.get("owned"):
                found.drift[host] = [
                    "what shapes its converge changed, and its record predates per-role converges"
                ]
            elif host in changed:
                found.partial[host] = to_run(set(changed[host]))
                found.drift[host] = [
                    "the inputs of " + ", ".join(changed[host]) + " changed (no drift): "
                    "converging " + ", ".join(found.partial[host])
                ]
            else:
                found.up_to_date[host] = int(answer.get("checked") or 0)
    return found


def hooks_for(host: str, groups: dict[str, list[str]], inputs: dict[str, Any]) -> list[list[str]]:
    """The host package's own drift report, on the hosts that run it."""
    contract = inputs.get("provision", {}).get("llamavm_contract") or {}
    switch = contract.get("paths", {}).get("switch")
    if switch and host in groups.get(MODEL_HOSTS, []):
        return [[switch, "drift", "--json"]]
    return []


def owners(observed_host: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """Which roles manage each item the callback saw (the record keeps a skipped role's)."""
    found: dict[str, dict[str, list[str]]] = {"files": {}, "units": {}, "packages": {}}
    for item in observed_host.get("files", []):
        found["files"][item["path"]] = list(item.get("roles") or [])
    for item in observed_host.get("units", []):
        found["units"][item["name"]] = list(item.get("roles") or [])
    for name, roles in (observed_host.get("package_roles") or {}).items():
        found["packages"][name] = list(roles)
    return found


def record(found: Plan, observed: dict[str, Any], hosts: list[str]) -> list[str]:
    """Write the record on each of `hosts` that converged (a host that converged in part keeps
    the items of the roles it skipped); the hosts it could not record on."""
    seen = observed.get("hosts", {})
    skip = found.skip_roles()
    per_host = {
        host: {
            "state": "record",
            "digest": found.digests[host],
            "path": found.record_path,
            "files": seen.get(host, {}).get("files", []),
            "units": seen.get(host, {}).get("units", []),
            "packages": seen.get(host, {}).get("packages", []),
            "hooks": found.hooks.get(host, []),
            "owners": owners(seen.get(host, {})),
            "keep_roles": skip.get(host, []),
        }
        for host in hosts
        if host in found.digests and host not in found.up_to_date
    }
    if not per_host:
        return []
    _, answers, _ = run_converge_play(found.inventory, per_host)
    notes = _notes(found.inventory)
    failed = []
    done = answers.get("probe", {})
    for host in per_host:
        if isinstance(done.get(host), dict) and "checked" in done[host]:
            split = found.split.get(host)
            notes[host] = (
                {"digest": split.digest, "roles": split.roles, "rest": split.rest}
                if split
                else found.digests[host]
            )
        else:
            notes.pop(host, None)
            failed.append(host)
    _save_notes(found.inventory, notes)
    return failed


def forget(inventory: Path, hosts: list[str]) -> None:
    """A converge that failed: probe those hosts no more until one succeeds."""
    notes = _notes(inventory)
    if any(notes.pop(h, None) for h in hosts):
        _save_notes(inventory, notes)


def report(found: Plan, say: Callable[[str], None]) -> None:
    """One line per host up to date; the drift of the others, a few lines each."""
    for host, checked in sorted(found.up_to_date.items()):
        say(
            f"llamavm: {host}: up to date — same inputs as its last converge, no drift in "
            f"{checked} managed items; its roles are skipped"
        )
    for host, items in sorted(found.drift.items()):
        first = items[0] if len(items) == 1 else f"{len(items)} differences"
        say(f"llamavm: {host}: converging — {first}")
        if len(items) > 1:
            for item in items[:SHOWN]:
                say(f"llamavm: {host}:   {item}")
            if len(items) > SHOWN:
                say(f"llamavm: {host}:   … and {len(items) - SHOWN} more")
        if host in found.partial and not items[0].startswith("the inputs of"):
            run = ", ".join(found.partial[host])
            say(f"llamavm: {host}: only the roles that manage what drifted run: {run}")


def repaired_lines(found: Plan, changes: dict[str, int]) -> list[str]:
    """After the converge: what it repaired on hosts whose probe had found drift."""
    lines = []
    probed = {"what shapes", "no converge", "a full converge", "the inputs of"}
    for host, items in sorted(found.drift.items()):
        if any(items[0].startswith(p) for p in probed):
            continue
        n = changes.get(host, 0)
        lines.append(
            f"llamavm: {host}: repaired ({n} changes): "
            + "; ".join(items[:SHOWN])
            + (f"; … and {len(items) - SHOWN} more" if len(items) > SHOWN else "")
        )
    return lines
