"""llamavm_observe: what the roles manage on each host, as `invoke provision` saw it converge.

An aggregate callback, silent unless $LLAMAVM_OBSERVE names a file: then, at the end of the
playbook, it writes there per host the files the roles wrote or shaped (copy, template, file,
lineinfile, ...), the units they enabled or started, the Debian packages they installed, and
the answers of the llamavm_converge module — each item with the roles whose tasks managed it.
llamavm/ops/converge.py turns the first three into the host's converge record
(ansible/library/llamavm_converge.py), and reads the last.
"""

from __future__ import annotations

import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: llamavm_observe
type: aggregate
short_description: Collect what a converge manages per host for llamavm's drift probe
description:
  - Writes a JSON summary to the file named by the LLAMAVM_OBSERVE environment variable.
requirements:
  - LLAMAVM_OBSERVE set in the environment (otherwise it does nothing)
"""

# Module (short name) -> how its result names the file it manages, and whether the role owns
# the whole content of that file.
FILE_MODULES = {
    "copy": ("dest", True),
    "template": ("dest", True),
    "file": ("path", False),
    "lineinfile": ("path", True),
    "blockinfile": ("path", True),
    "replace": ("path", True),
    "ini_file": ("path", True),
    # What a role reads to decide (where `current` points, a build's stamp) is what it manages
    # too: a hand change there makes the role do something else.
    "stat": ("path", False),
    "slurp": ("src", True),
}
#: llamavm_files (ansible/library): many files in one run; its result names them.
FILES_MODULE = "llamavm_files"
UNIT_MODULES = ("systemd_service", "systemd", "service")
PACKAGE_MODULES = ("apt", "package")
PROBE_MODULE = "llamavm_converge"


def _false(value) -> bool:
    return str(value).strip().lower() in ("false", "no", "0", "off")


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "llamavm_observe"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._out = os.environ.get("LLAMAVM_OBSERVE")
        self._hosts: dict[str, dict[str, dict]] = {}
        self._probe: dict[str, dict] = {}

    def _host(self, name: str) -> dict[str, dict]:
        return self._hosts.setdefault(name, {"files": {}, "units": {}, "packages": {}, "roles": {}})

    def v2_runner_on_ok(self, result) -> None:
        if not self._out:
            return
        task, answer = result._task, result._result
        if task.delegate_to or answer.get("_ansible_delegated_vars"):
            return  # what it touched is on another host
        action = str(task.action).rsplit(".", 1)[-1]
        host = result._host.get_name()
        items = answer.get("results") if isinstance(answer.get("results"), list) else [answer]
        for item in items:
            if not isinstance(item, dict) or item.get("skipped") or item.get("failed"):
                continue
            if action == PROBE_MODULE:
                self._probe[host] = {
                    k: item.get(k) for k in ("drift", "checked", "owned", "roles") if k in item
                }
            else:
                self._observe(host, action, task, item)

    def _observe(self, host: str, action: str, task, item: dict) -> None:
        args = item.get("invocation", {}).get("module_args") or {}
        if not isinstance(args, dict):
            return  # no_log: nothing to learn from
        seen = self._host(host)
        role = task._role.get_name() if getattr(task, "_role", None) else None

        def owned(kind: str, name: str) -> None:
            roles = seen["roles"].setdefault(kind, {}).setdefault(name, set())
            if role:
                roles.add(role)

        if action == FILES_MODULE:
            for path in item.get("files") or []:
                seen["files"][path] = True  # its content is the role's
                owned("files", path)
            for path in [*(item.get("directories") or []), *(item.get("absent") or [])]:
                seen["files"][path] = seen["files"].get(path, False)
                owned("files", path)
        elif action in FILE_MODULES:
            key, content = FILE_MODULES[action]
            path = args.get(key) if action in ("stat", "slurp") else None
            path = path or item.get(key) or item.get("path") or item.get("dest") or args.get(key)
            if isinstance(path, str) and path.startswith("/"):
                # The task's own word: an unchanged template reports the file module's args,
                # whose force defaults to false.
                force = task.args.get("force", True)
                owns = content and not _false(force) and args.get("state") != "absent"
                seen["files"][path] = seen["files"].get(path, False) or owns
                owned("files", path)
        elif action in UNIT_MODULES:
            name = args.get("name") or item.get("name")
            if isinstance(name, str) and name and args.get("scope") in (None, "system"):
                wants = args.get("state") in ("started", "restarted", "reloaded")
                seen["units"][name] = seen["units"].get(name, False) or wants
                owned("units", name)
        elif action in PACKAGE_MODULES:
            names = args.get("name") or args.get("pkg") or []
            for name in [names] if isinstance(names, str) else names:
                if isinstance(name, str) and not any(c in name for c in "*?/"):
                    seen["packages"][name.split("=", 1)[0]] = True
                    owned("packages", name.split("=", 1)[0])

    def v2_playbook_on_stats(self, stats) -> None:
        if not self._out:
            return

        def roles(seen: dict, kind: str, name: str) -> list:
            return sorted(seen["roles"].get(kind, {}).get(name, ()))

        summary = {
            "hosts": {
                host: {
                    "files": [
                        {"path": p, "content": c, "roles": roles(seen, "files", p)}
                        for p, c in sorted(seen["files"].items())
                    ],
                    "units": [
                        {"name": n, "active": a, "roles": roles(seen, "units", n)}
                        for n, a in sorted(seen["units"].items())
                    ],
                    "packages": sorted(seen["packages"]),
                    "package_roles": {
                        n: roles(seen, "packages", n) for n in sorted(seen["packages"])
                    },
                }
                for host, seen in self._hosts.items()
            },
            "probe": self._probe,
        }
        with open(self._out, "w") as handle:
            json.dump(summary, handle)
