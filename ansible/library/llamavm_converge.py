#!/usr/bin/python
"""llamavm_converge: the record a converge leaves on a host, and the cheap drift probe over it.

`invoke provision` (llamavm/ops/converge.py) runs this module twice around a converge:

- `state: verify` before: reads the host's record, compares its digest with the one the
  controller computed from everything that shapes the converge (roles, playbooks, the host
  contract, the host package, the llama.cpp source, the host's inventory variables), then takes
  a new snapshot of what the record lists — the files the roles wrote, the units they enabled
  or started, the packages they installed, the host's fingerprint (OS, kernel, CPU flags,
  machine id, a GPU driver) — and says what differs. No difference: the controller skips the
  roles' module runs for the host. Read-only, also in check mode.
- `state: record` after a converge that succeeded: snapshots the items the controller saw the
  roles manage (llamavm_observe callback) and writes the record (0600 root, atomically), with
  the roles that manage each item (`owners`). A converge that ran only some roles names the
  others in `keep_roles`: the items they manage in the old record are snapshotted again and
  kept (the probe before it found them as recorded).

Hooks are host commands that report drift in their own domain as JSON (`{"drift": [...]}`):
`llamavm-switch drift` says whether `llamavm-switch apply` would install, restart, remove or
start anything. A hook that is missing (not installed yet) or fails counts as drift.

Only the standard library: it runs with the host's Python (3.10+: Debian 12, Ubuntu 22.04 on).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: llamavm_converge
short_description: Record what a converge manages on a host; probe it for drift
description:
  - C(state=record) snapshots the listed files, units and packages and the host's fingerprint
    into the record file; C(state=verify) compares a new snapshot with the record.
options:
  state:
    description: record or verify.
    choices: [record, verify]
    required: true
    type: str
  digest:
    description: digest of everything that shapes the converge of this host.
    required: true
    type: str
  path:
    description: the record file.
    required: true
    type: path
  files:
    description: files to snapshot; C(content=true) adds their digest.
    type: list
    elements: dict
    default: []
  units:
    description: systemd units to snapshot; C(active=true) adds their active state.
    type: list
    elements: dict
    default: []
  packages:
    description: Debian packages whose install status to snapshot.
    type: list
    elements: str
    default: []
  hooks:
    description: argv lists of commands that print C({"drift": [...]}).
    type: list
    elements: list
    default: []
  owners:
    description: C(files), C(units), C(packages) - per item the roles that manage it.
    type: dict
    default: {}
  keep_roles:
    description: roles that did not run; the old record's items they manage are kept.
    type: list
    elements: str
    default: []
"""

# Files above this size are compared by size and modification time, not by content: a lab's
# NFS export holds GGUFs of many GiB, and a hand edit changes the mtime anyway.
CONTENT_LIMIT = 8 * 1024 * 1024
#: The role whose state the hooks (`llamavm-switch drift`) report.
HOOK_ROLE = "model_services"
FINGERPRINT_FILES = ("/etc/os-release", "/etc/machine-id", "/proc/driver/nvidia/version")
GPU_TOOLS = ("nvidia-smi",)


def file_state(path: str, content: bool) -> dict:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"type": "absent"}
    except OSError as exc:
        return {"type": "unreadable", "error": exc.strerror or str(exc)}
    state = {"mode": f"{stat.S_IMODE(st.st_mode):04o}", "uid": st.st_uid, "gid": st.st_gid}
    if stat.S_ISLNK(st.st_mode):
        state.update(type="link", target=os.readlink(path))
    elif stat.S_ISDIR(st.st_mode):
        state["type"] = "directory"
    elif stat.S_ISREG(st.st_mode):
        state.update(type="file", empty=st.st_size == 0)
        if content and st.st_size <= CONTENT_LIMIT:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            state["sha256"] = digest.hexdigest()
        elif content:
            state.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    else:
        state["type"] = "other"
    return state


def _output(argv: list) -> str:
    """A query's standard output (its exit code says nothing here: dpkg-query exits 1 when
    one of the packages is unknown, and still lists the others)."""
    proc = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=False
    )
    return proc.stdout


def unit_states(units: list) -> dict:
    if not units or not shutil.which("systemctl"):
        return {}
    names = sorted({u["name"] for u in units})
    out = _output(["systemctl", "show", "--property=Id,LoadState,UnitFileState,ActiveState",
                   "--", *names])  # fmt: skip
    blocks = [b for b in out.split("\n\n") if b.strip()]
    wants_active = {u["name"] for u in units if u.get("active")}
    found = {}
    for name, block in zip(names, blocks, strict=False):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        state = {"load": props.get("LoadState", ""), "file": props.get("UnitFileState", "")}
        if name in wants_active:
            # "activating"/"reloading" are on their way to active: not drift.
            active = props.get("ActiveState", "")
            state["active"] = "active" if active in ("activating", "reloading") else active
        found[name] = state
    return found


def package_states(packages: list) -> dict:
    names = sorted(set(packages))
    if not names or not shutil.which("dpkg-query"):
        return {}
    out = _output(["dpkg-query", "-W", "-f=${Package}\t${db:Status-Abbrev}\n", "--", *names])
    found = dict.fromkeys(names, "not installed")
    for line in out.splitlines():
        name, _, status = line.partition("\t")
        name = name.split(":", 1)[0]
        if name in found:
            found[name] = "installed" if status.startswith("ii") else "not installed"
    return found


def fingerprint() -> dict:
    found = {"kernel": platform.release()}
    for path in FINGERPRINT_FILES:
        try:
            with open(path, "rb") as handle:
                found[path] = hashlib.sha256(handle.read()).hexdigest()
        except OSError:
            found[path] = None
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith(("flags", "Features"))), "")
        found["cpu_flags"] = hashlib.sha256(flags.encode()).hexdigest()
    except OSError:
        found["cpu_flags"] = None
    for tool in GPU_TOOLS:
        where = shutil.which(tool)
        if where:
            st = os.stat(where)
            found[tool] = f"{where} {st.st_size} {st.st_mtime_ns}"
        else:
            found[tool] = None
    try:
        found["nvidia_devices"] = sorted(d for d in os.listdir("/dev") if d.startswith("nvidia"))
    except OSError:
        found["nvidia_devices"] = []
    return found


def run_hooks(hooks: list) -> list:
    drift = []
    for argv in hooks:
        label = os.path.basename(str(argv[0])) + " " + " ".join(str(a) for a in argv[1:])
        try:
            proc = subprocess.run(
                [str(a) for a in argv],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            answer = json.loads(proc.stdout) if proc.returncode == 0 else None
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            drift.append(f"{label}: could not ask ({exc})")
            continue
        if not isinstance(answer, dict) or not isinstance(answer.get("drift"), list):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no answer"]
            drift.append(f"{label}: exit {proc.returncode} ({tail[0][:200]})")
            continue
        drift.extend(str(item) for item in answer["drift"])
    return drift


def snapshot(files: list, units: list, packages: list) -> dict:
    return {
        "files": {f["path"]: file_state(f["path"], bool(f.get("content"))) for f in files},
        "units": unit_states(units),
        "packages": package_states(packages),
        "fingerprint": fingerprint(),
    }


def describe_file(path: str, was: dict, now: dict) -> str:
    if now.get("type") == "absent":
        return f"{path}: deleted"
    if was.get("type") == "absent":
        return f"{path}: appeared (it was removed)"
    if was.get("type") != now.get("type"):
        return "{}: is a {} now (was a {})".format(path, now.get("type"), was.get("type"))
    parts = []
    if was.get("sha256") != now.get("sha256") or was.get("mtime_ns") != now.get("mtime_ns"):
        parts.append("content changed")
    if was.get("empty") is False and now.get("empty"):
        parts.append("emptied")
    if was.get("target") != now.get("target"):
        parts.append("points to {} (was {})".format(now.get("target"), was.get("target")))
    if was.get("mode") != now.get("mode"):
        parts.append("mode {} (was {})".format(now.get("mode"), was.get("mode")))
    if (was.get("uid"), was.get("gid")) != (now.get("uid"), now.get("gid")):
        parts.append(
            "owner {}:{} (was {}:{})".format(
                now.get("uid"), now.get("gid"), was.get("uid"), was.get("gid")
            )
        )
    return "{}: {}".format(path, ", ".join(parts or ["changed"]))


def compare(record: dict, now: dict) -> list:
    return [message for _, _, message in differences(record, now)]


def differences(record: dict, now: dict) -> list:
    """(kind, name, message) for each difference; kind None for the host's fingerprint."""
    drift = []
    for path, was in sorted(record.get("files", {}).items()):
        state = now["files"].get(path)
        if state != was:
            drift.append(("files", path, describe_file(path, was, state or {"type": "absent"})))
    for name, was in sorted(record.get("units", {}).items()):
        state = now["units"].get(name, {})
        if state.get("load") != was.get("load") or state.get("file") != was.get("file"):
            message = "unit {}: {}/{} (was {}/{})".format(
                name, state.get("load"), state.get("file"), was.get("load"), was.get("file")
            )
            drift.append(("units", name, message))
        elif "active" in was and state.get("active") != was["active"]:
            message = "unit {}: {} (was {})".format(name, state.get("active"), was["active"])
            drift.append(("units", name, message))
    for name, was in sorted(record.get("packages", {}).items()):
        if now["packages"].get(name) != was:
            message = "package {}: {} (was {})".format(name, now["packages"].get(name), was)
            drift.append(("packages", name, message))
    for key, was in sorted(record.get("fingerprint", {}).items()):
        if now["fingerprint"].get(key) != was:
            drift.append((None, key, f"the host changed: {key}"))
    return drift


def drift_roles(record: dict, found: list, hook_drift: list):
    """The roles that manage what drifted (sorted), or None when any of it has no owner in the
    record (the host itself changed, an item from before owners): then every role runs. The
    hooks report the model services' own state (`llamavm-switch drift`)."""
    owners = record.get("owners")
    if not isinstance(owners, dict):
        return None
    roles = {HOOK_ROLE} if hook_drift else set()
    for kind, name, _ in found:
        theirs = (owners.get(kind) or {}).get(name) if kind else None
        if not theirs:
            return None
        roles.update(theirs)
    return sorted(roles)


def load_record(path: str):
    try:
        with open(path) as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return None, "no record of an earlier converge"
    except (OSError, ValueError) as exc:
        return None, f"the record {path} is unreadable ({exc})"
    if not isinstance(record, dict) or not isinstance(record.get("digest"), str):
        return None, f"the record {path} is malformed"
    return record, None


def write_record(path: str, record: dict) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".converge-", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def verify(params: dict) -> dict:
    record, problem = load_record(params["path"])
    if record is None:
        return {"drift": [problem], "checked": 0}
    if record["digest"] != params["digest"]:
        return {"drift": ["what shapes the converge changed since the last one"], "checked": 0}
    now = snapshot(
        [
            {"path": p, "content": "sha256" in s or "size" in s}
            for p, s in record.get("files", {}).items()
        ],
        [{"name": n, "active": "active" in s} for n, s in record.get("units", {}).items()],
        list(record.get("packages", {})),
    )
    found = differences(record, now)
    hooked = run_hooks(record.get("hooks", []))
    checked = sum(len(record.get(k, {})) for k in ("files", "units", "packages"))
    return {
        "drift": [message for _, _, message in found] + hooked,
        "checked": checked,
        "owned": isinstance(record.get("owners"), dict),
        "roles": drift_roles(record, found, hooked),
    }


def kept(params: dict) -> tuple:
    """The old record's files, units, packages and owners that `keep_roles` manage."""
    keep = set(params.get("keep_roles") or [])
    if not keep:
        return [], [], [], {}
    old, problem = load_record(params["path"])
    if old is None or not isinstance(old.get("owners"), dict):
        raise ValueError(problem or "the record has no owners to keep the skipped roles' items by")
    owners = old["owners"]

    def theirs(kind: str) -> dict:
        return {
            name: roles
            for name, roles in (owners.get(kind) or {}).items()
            if keep.intersection(roles or [])
        }

    files = [
        {"path": p, "content": "sha256" in old["files"][p] or "size" in old["files"][p]}
        for p in theirs("files")
        if p in old.get("files", {})
    ]
    units = [
        {"name": n, "active": "active" in old["units"][n]}
        for n in theirs("units")
        if n in old.get("units", {})
    ]
    packages = [n for n in theirs("packages") if n in old.get("packages", {})]
    return files, units, packages, {k: theirs(k) for k in ("files", "units", "packages")}


def record(params: dict) -> dict:
    old_files, old_units, old_packages, old_owners = kept(params)
    files = {}
    for item in old_files + params["files"]:  # the same path seen twice: content wins
        files[item["path"]] = files.get(item["path"], False) or bool(item.get("content"))
    units = {}
    for item in old_units + params["units"]:
        units[item["name"]] = units.get(item["name"], False) or bool(item.get("active"))
    taken = snapshot(
        [{"path": p, "content": c} for p, c in files.items()],
        [{"name": n, "active": a} for n, a in units.items()],
        sorted(set(old_packages) | set(params["packages"])),
    )
    # A unit that failed to load at record time is not a baseline to hold the host to.
    taken["units"] = {n: s for n, s in taken["units"].items() if s.get("load") == "loaded"}
    owners = {}
    for kind in ("files", "units", "packages"):
        merged = {name: sorted(roles) for name, roles in old_owners.get(kind, {}).items()}
        for name, roles in ((params.get("owners") or {}).get(kind) or {}).items():
            merged[name] = sorted(set(merged.get(name, [])) | set(roles or []))
        owners[kind] = {name: roles for name, roles in merged.items() if name in taken[kind]}
    taken.update(digest=params["digest"], hooks=params["hooks"], owners=owners)
    write_record(params["path"], taken)
    return {"changed": True, "checked": sum(len(taken[k]) for k in ("files", "units", "packages"))}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "required": True, "choices": ["record", "verify"]},
            "digest": {"type": "str", "required": True},
            "path": {"type": "path", "required": True},
            "files": {"type": "list", "elements": "dict", "default": []},
            "units": {"type": "list", "elements": "dict", "default": []},
            "packages": {"type": "list", "elements": "str", "default": []},
            "hooks": {"type": "list", "elements": "list", "default": []},
            "owners": {"type": "dict", "default": {}},
            "keep_roles": {"type": "list", "elements": "str", "default": []},
        },
        supports_check_mode=True,
    )
    params = module.params
    if params["state"] == "verify":
        result = verify(params)
        module.exit_json(changed=False, **result)
    if module.check_mode:
        module.exit_json(changed=False, checked=0)
    try:
        result = record(params)
    except ValueError as exc:
        module.fail_json(msg=f"could not keep the skipped roles' items: {exc}")
    except OSError as exc:
        module.fail_json(msg="could not write {}: {}".format(params["path"], exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
