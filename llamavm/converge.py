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
module runs are skipped; anything else (a hand-edited unit, a deleted file, a stopped service, a
removed package, a new GPU, other inputs) runs the whole converge as before, says what it found,
and records again. The controller remembers which digest it recorded per host
(`$LLAMAVM_STATE/converge/`) only to avoid probing a host it certainly has to converge.
To see why a digest changed, set LLAMAVM_DIGEST_DUMP=FILE: provision writes what went into it.
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

from llamavm import REPO_ROOT

PLAYBOOK = REPO_ROOT / "ansible" / "playbooks" / "converge.yml"
ANSIBLE_TREE = REPO_ROOT / "ansible"
#: The record's name in the host's state directory (config/host.yaml paths.state_dir).
RECORD_NAME = "converge.json"
#: The inventory group whose hosts run the host package (its drift hook).
MODEL_HOSTS = "llamavm_hosts"
#: How many drift lines per host provision prints (the rest are counted).
SHOWN = 8


def state_dir() -> Path:
    return Path(os.environ.get("LLAMAVM_STATE", "/var/lib/llamavm")) / "converge"


def _file_digests() -> Path:
    return Path(os.environ.get("LLAMAVM_CACHE", "/var/cache/llamavm")) / "digests.json"


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


def tree_digest(root: Path = ANSIBLE_TREE) -> str:
    """Every file under `root` by path and content."""
    digest = hashlib.sha256()
    for path in _walk(root):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(root)}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def normalize(value: Any, files: _Digests, depth: int = 0) -> Any:
    """`value` with each absolute path of an existing file replaced by its content digest, and
    a playbook variable that names a directory (llamavm_controller_share) by its
    listing (names, sizes, mtimes): what a role reads from there. Deeper directory paths are
    the hosts' own (the contract's /var/lib/llamavm), not the controller's: left as they are."""
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


def digests(inputs: dict[str, Any], hostvars: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Per host, the digest of everything that shapes its converge."""
    files = _Digests()
    shared = {
        "tree": tree_digest(),
        "inputs": normalize(inputs, files),
        "ansible": _ansible_version(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("ANSIBLE_")},
    }
    files.save()
    base = json.dumps(shared, sort_keys=True, default=str)
    if os.environ.get("LLAMAVM_DIGEST_DUMP"):  # what went into it, to see why it changed
        Path(os.environ["LLAMAVM_DIGEST_DUMP"]).write_text(base)
    found = {}
    for host, hv in sorted(hostvars.items()):
        own = json.dumps(hv, sort_keys=True, default=str)
        found[host] = hashlib.sha256(f"{base}\0{host}\0{own}".encode()).hexdigest()
    return found


@dataclass
class Plan:
    """What provision found before it ran the roles."""

    inventory: Path
    digests: dict[str, str]
    record_path: str
    hooks: dict[str, list[list[str]]] = field(default_factory=dict)
    drift: dict[str, list[str]] = field(default_factory=dict)
    up_to_date: dict[str, int] = field(default_factory=dict)  # host -> items checked

    @property
    def all_up_to_date(self) -> bool:
        return bool(self.digests) and set(self.up_to_date) == set(self.digests)


def _note_path(inventory: Path) -> Path:
    key = hashlib.sha256(str(inventory.resolve()).encode()).hexdigest()[:24]
    return state_dir() / f"{key}.json"


def _notes(inventory: Path) -> dict[str, str]:
    try:
        data = json.loads(_note_path(inventory).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_notes(inventory: Path, notes: dict[str, str]) -> None:
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
    from llamavm import provision

    with tempfile.TemporaryDirectory(prefix="llamavm-converge-") as tmp:
        observed = Path(tmp) / "observed.json"
        lines: list[str] = []
        rc, _ = provision.run_playbook(
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
    same digest. `full`: probe nothing (every host converges)."""
    found = Plan(inventory, digests(inputs, hostvars), record_path)
    found.hooks = {h: hooks_for(h, groups, inputs) for h in found.digests}
    notes = _notes(inventory)
    for host, digest in found.digests.items():
        if full:
            found.drift[host] = ["a full converge was asked for (--full)"]
        elif notes.get(host) != digest:
            found.drift[host] = [
                "what shapes its converge changed since the last one"
                if host in notes
                else "no converge of it recorded by this controller"
            ]
    probe = {
        host: {"state": "verify", "digest": digest, "path": record_path}
        for host, digest in found.digests.items()
        if host not in found.drift
    }
    if probe:
        _, observed, _ = run_converge_play(inventory, probe, check=check)
        answers = observed.get("probe", {})
        for host in probe:
            answer = answers.get(host)
            if not isinstance(answer, dict) or not isinstance(answer.get("drift"), list):
                found.drift[host] = ["the drift probe could not ask it (unreachable or failed)"]
            elif answer["drift"]:
                found.drift[host] = [str(item) for item in answer["drift"]]
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


def record(found: Plan, observed: dict[str, Any], hosts: list[str]) -> list[str]:
    """Write the record on each of `hosts` that converged; hosts it could not record on."""
    seen = observed.get("hosts", {})
    per_host = {
        host: {
            "state": "record",
            "digest": found.digests[host],
            "path": found.record_path,
            "files": seen.get(host, {}).get("files", []),
            "units": seen.get(host, {}).get("units", []),
            "packages": seen.get(host, {}).get("packages", []),
            "hooks": found.hooks.get(host, []),
        }
        for host in hosts
        if host in found.digests
    }
    if not per_host:
        return []
    _, answers, _ = run_converge_play(found.inventory, per_host)
    notes = _notes(found.inventory)
    failed = []
    done = answers.get("probe", {})
    for host in per_host:
        if isinstance(done.get(host), dict) and "checked" in done[host]:
            notes[host] = found.digests[host]
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


def repaired_lines(found: Plan, changes: dict[str, int]) -> list[str]:
    """After the converge: what it repaired on hosts whose probe had found drift."""
    lines = []
    probed = {"what shapes", "no converge", "a full converge"}
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
