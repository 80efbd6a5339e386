"""systemctl, systemd-run and journalctl: the seam between the transaction and systemd.

Unit tests replace `Systemd` with a fake; everything else in the host package talks to systemd
only through it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence


class Systemd:
    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), capture_output=True, text=True, check=False, timeout=timeout
        )

    def show(self, units: Sequence[str], props: Sequence[str]) -> dict[str, dict[str, str]]:
        """Properties of several units in one systemctl call: {unit: {prop: value}}."""
        if not units:
            return {}
        out = self._run("systemctl", "show", "--property=Id," + ",".join(props), *units).stdout
        found: dict[str, dict[str, str]] = {}
        for block in out.split("\n\n"):
            values = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            if "Id" in values:
                found[values["Id"]] = values
        return found

    def props(self, unit: str, *names: str) -> dict[str, str]:
        return self.show([unit], names).get(unit, {})

    def start(self, unit: str) -> str:
        """Queue a start (no waiting); '' or the error systemctl printed."""
        run = self._run("systemctl", "start", "--no-block", unit)
        return "" if run.returncode == 0 else run.stderr.strip()

    def stop(self, units: Sequence[str]) -> None:
        """Stop units and wait until they are inactive."""
        if units:
            self._run("systemctl", "stop", *units, timeout=600)

    def try_restart(self, unit: str) -> None:
        """Restart `unit` if it runs (queued, no waiting); nothing if it doesn't."""
        self._run("systemctl", "try-restart", "--no-block", unit)

    def reset_failed(self, units: Sequence[str]) -> None:
        if units:
            self._run("systemctl", "reset-failed", *units)

    def daemon_reload(self) -> None:
        run = self._run("systemctl", "daemon-reload")
        if run.returncode != 0:
            raise OSError(f"systemctl daemon-reload failed: {run.stderr.strip()}")

    def disable(self, units: Sequence[str]) -> None:
        if units:
            self._run("systemctl", "disable", "--quiet", *units)

    def enabled(self, units: Sequence[str]) -> list[str]:
        """Which of `units` are enabled."""
        props = self.show(units, ["UnitFileState"])
        return [u for u in units if props.get(u, {}).get("UnitFileState") == "enabled"]

    def system_state(self) -> str:
        """`systemctl is-system-running`: running, degraded, starting, stopping, ..."""
        return self._run("systemctl", "is-system-running").stdout.strip()

    def journal_tail(self, unit: str, lines: int = 25) -> str:
        run = self._run("journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat")
        return run.stdout.strip()

    def run_transient(self, unit: str, argv: Sequence[str], properties: Sequence[str]) -> str:
        """Start argv as the transient service `unit`; '' or the error."""
        cmd = ["systemd-run", f"--unit={unit}", "--quiet", "--collect", "--service-type=exec"]
        cmd += [f"--property={p}" for p in properties]
        run = self._run(*cmd, "--", *argv)
        return "" if run.returncode == 0 else (run.stderr or run.stdout).strip()
