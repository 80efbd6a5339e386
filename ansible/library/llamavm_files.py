#!/usr/bin/python
"""llamavm_files: a role's small files, directories and stale files in one module run.

A role that writes ten small files (units, a rule set, a drop-in, the host contract) with
`template`/`copy`/`file` pays one module run each — a third of a second on a native host, two to
five seconds in a TCG VM — even when nothing changes. This module takes them all at once: the
directories first, then every file (content rendered on the controller, e.g. with
`lookup('ansible.builtin.template', ...)`), each written only when its content, owner, group or
mode differ, atomically (a temporary file in the same directory, checked by the file's
`validate` command before it replaces the old one), then the files of the `prune` directories
that match their patterns and are not among `files`. It says which paths it changed
(`changed_paths`), so the tasks after it restart or reload only what a change concerns.

Only the standard library: it runs with the host's Python (3.10+: Debian 12, Ubuntu 22.04 on).
"""

from __future__ import annotations

import fnmatch
import grp
import os
import pwd
import shlex
import stat
import subprocess
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: llamavm_files
short_description: Ensure many small files and directories in one module run
description:
  - Creates the directories, writes each file whose content, owner, group or mode differ
    (atomically, after its validate command passed), removes files marked absent and the
    files of the prune directories that match their patterns and are not listed.
options:
  directories:
    description: >-
      directories to create or fix: a path (root:root 0755) or a dict of path, owner, group,
      mode.
    type: list
    elements: raw
    default: []
  files:
    description: >-
      files: path, content, mode, owner and group (root), validate (a command, %s for the new
      file).
    type: list
    elements: dict
    default: []
  absent:
    description: files to remove (a directory there is an error).
    type: list
    elements: path
    default: []
  prune:
    description: >-
      directories (path) whose files matching the patterns (list of shell patterns) and not
      among C(files) are removed.
    type: list
    elements: dict
    default: []
"""

RETURN = r"""
changed_paths:
  description: the paths created, rewritten, fixed or removed, in the order they were handled.
  type: list
  returned: always
files:
  description: the files this run manages (what a converge record snapshots).
  type: list
  returned: always
directories:
  description: the directories this run manages.
  type: list
  returned: always
"""


def _ids(owner: str, group: str) -> tuple[int, int]:
    try:
        uid = pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ValueError(f"no user named {owner!r} on this host") from None
    try:
        return uid, grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no group named {group!r} on this host") from None


def _mode(value) -> int:
    try:
        mode = int(str(value), 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {value!r} is not an octal mode such as '0644'")
    return mode


def _absolute(path) -> str:
    if not isinstance(path, str) or not os.path.isabs(path):
        raise ValueError(f"path {path!r} is not absolute")
    return path


def _wrong_meta(st: os.stat_result, uid: int, gid: int, mode: int) -> bool:
    return st.st_uid != uid or st.st_gid != gid or stat.S_IMODE(st.st_mode) != mode


def ensure_directory(spec, check: bool) -> bool:
    spec = {"path": spec} if isinstance(spec, str) else spec
    path = spec["path"]
    uid, gid = _ids(spec.get("owner") or "root", spec.get("group") or "root")
    mode = _mode(spec.get("mode") or "0755")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not check:
            os.makedirs(path, mode=mode)
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        return True
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} exists and is not a directory")
    if _wrong_meta(st, uid, gid, mode):
        if not check:
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        return True
    return False


def _current(path: str) -> tuple[os.stat_result | None, bytes | None]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, None
    if not stat.S_ISREG(st.st_mode):
        return st, None
    with open(path, "rb") as handle:
        return st, handle.read()


def ensure_absent(path: str, check: bool, diffs: list) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is a directory; it is not removed as a file")
    if not check:
        os.unlink(path)
    diffs.append({"before_header": path, "after_header": path, "before": "(present)\n",
                  "after": "(absent)\n"})  # fmt: skip
    return True


def ensure_file(spec: dict, check: bool, diffs: list) -> bool:
    path = spec["path"]
    st, before = _current(path)
    content = str(spec["content"]).encode()
    uid, gid = _ids(spec.get("owner") or "root", spec.get("group") or "root")
    mode = _mode(spec["mode"])
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{path} exists and is not a regular file")
    if before == content and st is not None and stat.S_ISREG(st.st_mode):
        if not _wrong_meta(st, uid, gid, mode):
            return False
        if not check:
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        return True
    diffs.append({
        "before_header": path, "after_header": path,
        "before": (before or b"").decode(errors="replace"),
        "after": content.decode(errors="replace"),
    })  # fmt: skip
    if check:
        return True
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fchown(handle.fileno(), uid, gid)
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        if spec.get("validate"):
            argv = [tmp if part == "%s" else part.replace("%s", tmp)
                    for part in shlex.split(spec["validate"])]  # fmt: skip
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                said = (proc.stderr or proc.stdout).strip()
                raise ValueError(f"{path}: {spec['validate']} refused it: {said}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def prune(spec: dict, listed: set, check: bool, diffs: list) -> list:
    folder, patterns = spec["path"], spec.get("patterns") or ["*"]
    removed = []
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(folder, name)
        if path in listed or not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            continue
        if not check:
            os.unlink(path)
        diffs.append({"before_header": path, "after_header": path, "before": "(present)\n",
                      "after": "(absent)\n"})  # fmt: skip
        removed.append(path)
    return removed


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "directories": {"type": "list", "elements": "raw", "default": []},
            "files": {"type": "list", "elements": "dict", "default": []},
            "absent": {"type": "list", "elements": "path", "default": []},
            "prune": {"type": "list", "elements": "dict", "default": []},
        },
        supports_check_mode=True,
    )
    params, check = module.params, module.check_mode
    changed, diffs = [], []
    try:
        directories = [{"path": d} if isinstance(d, str) else d for d in params["directories"]]
        for spec in [*directories, *params["files"], *params["prune"]]:
            _absolute(spec.get("path") if isinstance(spec, dict) else spec)
        for path in params["absent"]:
            _absolute(path)
        for spec in directories:
            if ensure_directory(spec, check):
                changed.append(spec["path"])
        for spec in params["files"]:
            missing = {"path", "content", "mode"} - set(spec)
            if missing:
                raise ValueError(f"a file without {', '.join(sorted(missing))}: {sorted(spec)}")
            if ensure_file(spec, check, diffs):
                changed.append(spec["path"])
        for path in params["absent"]:
            if ensure_absent(path, check, diffs):
                changed.append(path)
        listed = {s["path"] for s in params["files"]}
        for spec in params["prune"]:
            changed += prune(spec, listed, check, diffs)
    except (KeyError, ValueError, OSError) as exc:
        module.fail_json(msg=str(exc), changed_paths=changed)
    result = {
        "changed": bool(changed),
        "changed_paths": changed,
        "files": sorted(listed),
        "directories": [d["path"] for d in directories],
        "absent": params["absent"],
    }
    if module._diff:
        result["diff"] = diffs
    module.exit_json(**result)


if __name__ == "__main__":
    main()
