"""The playbook runner: ansible-playbook with llamavm's Ansible configuration, its extra vars in
a 0600 file (never on the command line), its output passed on line by line and its PLAY RECAP
counted. Provisioning, converges and the tests run their playbooks through it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamavm import REPO_ROOT

ANSIBLE_CFG = REPO_ROOT / "ansible" / "ansible.cfg"
_RECAP_RE = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)"
)


@dataclass
class Recap:
    """PLAY RECAP counts per host."""

    hosts: dict[str, dict[str, int]] = field(default_factory=dict)

    def feed(self, line: str) -> None:
        match = _RECAP_RE.match(line.strip())
        if match:
            counts = {k: int(v) for k, v in match.groupdict().items() if k != "host"}
            self.hosts[match["host"]] = counts

    def merge(self, other: Recap) -> None:
        """Add another play run's counts."""
        for host, counts in other.hosts.items():
            mine = self.hosts.setdefault(host, dict.fromkeys(counts, 0))
            for key, value in counts.items():
                mine[key] = mine.get(key, 0) + value

    @property
    def changed(self) -> int:
        return sum(h["changed"] for h in self.hosts.values())


def ansible_env() -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_CFG),
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }


def run_playbook(
    playbook: Path,
    inventory: Path,
    extra_vars: dict[str, Any],
    *,
    limit: str | None = None,
    check: bool = False,
    echo: Callable[[str], None] = lambda line: print(line, end="", flush=True),
    env: dict[str, str] | None = None,
) -> tuple[int, Recap]:
    """ansible-playbook with the extra vars in a 0600 file (never on the command line)."""
    recap = Recap()
    with tempfile.NamedTemporaryFile("w", prefix="llamavm-vars-", suffix=".json") as handle:
        os.chmod(handle.name, 0o600)
        json.dump(extra_vars, handle)
        handle.flush()
        cmd = [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(inventory),
            "-e",
            f"@{handle.name}",
            str(playbook),
        ]
        if limit:
            cmd += ["--limit", limit]
        if check:
            cmd += ["--check", "--diff"]
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT / "ansible",
            env={**ansible_env(), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            echo(line)
            recap.feed(line)
        return proc.wait(), recap
