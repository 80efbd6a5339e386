"""One SSH call per host: run llamavm-switch on the hosts of an inventory.

Connection settings come from the inventory itself (`ansible-inventory --list`), so whatever
Ansible uses to reach a host — address, user, port, key, extra SSH options — is what we use.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamavm import REPO_ROOT
from llamavm.errors import LlamavmError

GROUP = "llamavm_hosts"


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    user: str | None
    port: int | None
    key: str | None
    ssh_args: tuple[str, ...]

    def ssh_command(self, remote: list[str], tty: bool = False) -> list[str]:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
        if tty:
            cmd.append("-t")
        if self.key:
            cmd += ["-i", self.key]
        if self.port:
            cmd += ["-p", str(self.port)]
        cmd += list(self.ssh_args)
        target = f"{self.user}@{self.address}" if self.user else self.address
        return [*cmd, target, "--", shlex.join(remote)]


def hosts(inventory: Path, only: str | None = None) -> list[Host]:
    """The hosts of GROUP in `inventory` (or just `only`)."""
    tool = Path(sys.executable).parent / "ansible-inventory"
    run = subprocess.run(
        [str(tool), "-i", str(inventory), "--list"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT / "ansible",
        check=False,
    )
    if run.returncode != 0:
        raise LlamavmError(f"{inventory}: ansible-inventory failed: {run.stderr.strip()[:300]}")
    data = json.loads(run.stdout)
    names = _group_hosts(data, GROUP)
    if not names:
        raise LlamavmError(f"{inventory}: no hosts in group {GROUP} — add your model hosts there")
    if only:
        if only not in names:
            raise LlamavmError(
                f"{inventory}: no host {only!r} in {GROUP} — hosts: {', '.join(names)}"
            )
        names = [only]
    hostvars = data.get("_meta", {}).get("hostvars", {})
    return [_host(name, hostvars.get(name, {})) for name in names]


def _group_hosts(data: dict[str, Any], group: str) -> list[str]:
    entry = data.get(group, {})
    names = list(entry.get("hosts", []))
    for child in entry.get("children", []):
        names += [n for n in _group_hosts(data, child) if n not in names]
    return names


def _host(name: str, hv: dict[str, Any]) -> Host:
    args: list[str] = []
    for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        if hv.get(key):
            args += shlex.split(str(hv[key]))
    port = hv.get("ansible_port") or hv.get("ansible_ssh_port")
    return Host(
        name=name,
        address=str(hv.get("ansible_host", name)),
        user=hv.get("ansible_user"),
        port=int(port) if port else None,
        key=hv.get("ansible_ssh_private_key_file"),
        ssh_args=tuple(args),
    )


def run(host: Host, remote: list[str], *, stream: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `remote` as root on `host`; its stderr (progress) streams to ours."""
    proc = subprocess.run(
        host.ssh_command(["sudo", "-n", *remote]),
        stdout=subprocess.PIPE,
        stderr=None if stream else subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode == 255:
        raise LlamavmError(
            f"{host.name}: SSH to {host.address} failed — check the host is up "
            "(invoke doctor) and the inventory's connection settings"
        )
    return proc


def switch_tool(host: Host, args: list[str], *, stream: bool = True) -> tuple[int, dict[str, Any]]:
    """Run `llamavm-switch ARGS --json` on `host`: (exit code, its JSON answer)."""
    proc = run(host, ["llamavm-switch", *args, "--json"], stream=stream)
    if proc.returncode == 127 or "command not found" in (proc.stderr or ""):
        raise LlamavmError(f"{host.name}: llamavm-switch is not installed — run invoke provision")
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        answer = {"ok": False, "error": proc.stdout.strip()[-300:]}
    return proc.returncode, answer
