"""The model units' files: install the units provision staged (`apply`), and say what that would
change (`drift`, the drift probe of `invoke provision`). `UnitFiles` is a part of the
`Transaction`: a unit whose [Service] changed is restarted through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamavm.host import EXIT_REFUSED
from llamavm.host.contract import Contract, HostError, Model
from llamavm.host.runtime import BUSY


def service_section(text: str) -> list[str]:
    """The [Service] settings of a unit file (comments, blanks, continuations folded)."""
    section, lines, pending = "", [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if pending:
            line, pending = pending + " " + line, ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line
            continue
        if section == "[Service]":
            lines.append(" ".join(line.split()))
    return lines


def install_unit(path: Path, text: str) -> None:
    """Write a unit file atomically (root:root 0644)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def unit_texts(contract: Contract) -> tuple[dict[str, str], dict[str, str]]:
    """The staged and the installed text of every model unit."""
    paths = contract.paths
    staged: dict[str, str] = {}
    for model in (*contract.models, *contract.companions):
        try:
            staged[model.unit] = (paths.units_staged / model.unit).read_text()
        except OSError:
            raise HostError(
                f"{paths.units_staged / model.unit} is missing — run 'invoke provision'",
                EXIT_REFUSED,
            ) from None
    live = {
        p.name: p.read_text()
        for pattern in contract.unit_globs
        for p in paths.units_live.glob(pattern)
    }
    return staged, live


class UnitFiles:
    """`drift` and `apply` of the `Transaction` (a part of it: these are its own)."""

    host: Any  # the transaction's Host
    contract: Contract
    _state: Callable[[], dict[str, Any]]
    _restart: Callable[..., dict[str, Any]]
    switch: Callable[[str], dict[str, Any]]
    sync_firewall: Callable[[], dict[str, Any]]

    def _restore_unit(self, model: Model | None, backup: str | None) -> None:
        if model is None or not backup:
            return
        try:
            text = Path(backup).read_text()
        except OSError:
            return
        install_unit(self.contract.paths.units_live / model.unit, text)
        self.host.systemd.daemon_reload()

    def drift(self) -> list[str]:
        """What `apply` would do now, without doing it (read-only, no lock): the drift probe
        of `invoke provision` asks this before it skips a host's roles."""
        staged, live = unit_texts(self.contract)
        found = [
            f"{self.contract.paths.units_live / u}: "
            + ("missing" if u not in live else "differs from the staged unit")
            for u, text in sorted(staged.items())
            if live.get(u) != text
        ]
        found += [
            f"{self.contract.paths.units_live / u}: its model is no longer in the catalog"
            for u in sorted(live)
            if u not in staged
        ]
        running = self.host.running()
        if len(running) > 1:
            found.append("several models run: " + ", ".join(m.name for m in running))
        elif not running:
            found.append("no model serves (provision starts the chosen one)")
        elif self.host.runs_current_build(running[0]) is False:
            found.append(f"{running[0].name} runs an older llama.cpp build")
        if len(running) == 1:
            beside = {m.name for m in self.host.running_companions()}
            found += [
                f"companion {m.name} is not running beside {running[0].name}"
                for m in self.contract.beside(running[0])
                if m.name not in beside
            ]
        every = [m.unit for m in (*self.contract.models, *self.contract.companions)]
        enabled = self.host.systemd.enabled(every)
        found += [f"{unit}: enabled (only the boot unit starts models)" for unit in enabled]
        return found

    def apply(self) -> dict[str, Any]:
        """Install the units provision staged; restart the serving model only when its
        [Service] changed (through this transaction), never for a dependency change."""
        paths = self.contract.paths
        staged, live = unit_texts(self.contract)
        running = self.host.running()
        if len(running) > 1:  # started by hand around Conflicts=: keep the chosen one
            desired = self._state()["desired"]
            keep = next((m for m in running if m.name == desired), running[0])
            self.host.progress(f"several models run; keeping {keep.name}")
            self.host.stop_units([m for m in running if m != keep])
            running = [keep]
        serving = running[0] if running else None
        report: dict[str, Any] = {"installed": [], "restarted": [], "removed": [], "started": None}
        changed = [unit for unit, text in staged.items() if live.get(unit) != text]
        restart = [
            u
            for u in changed
            if serving and u == serving.unit and u in live
            and service_section(live[u]) != service_section(staged[u])
        ]  # fmt: skip
        # A running companion whose [Service] changed restarts (plainly: nothing is exclusive).
        companions = {m.unit: m for m in self.contract.companions}
        beside = {m.unit for m in self.host.running_companions()}
        restart_companions = [
            companions[u]
            for u in changed
            if u in companions and u in beside and u in live
            and service_section(live[u]) != service_section(staged[u])
        ]  # fmt: skip
        removed = [unit for unit in live if unit not in staged]
        if removed:  # units of models no longer in the catalog: stop them if they run
            states = self.host.systemd.show(removed, ["ActiveState"])
            busy = [u for u in removed if states.get(u, {}).get("ActiveState") in BUSY]
            for unit in busy:
                self.host.progress(f"stopping {unit}: its model left the catalog")
            self.host.systemd.stop(busy)
        for unit in [u for u in changed if u not in restart]:
            install_unit(paths.units_live / unit, staged[unit])
            report["installed"].append(unit)
        for unit in removed:
            self.host.systemd.disable([unit])
            (paths.units_live / unit).unlink(missing_ok=True)
            report["removed"].append(unit)
        if report["installed"] or report["removed"]:
            self.host.systemd.daemon_reload()
        if serving and not restart and self.host.runs_current_build(serving) is False:
            self.host.progress(f"{serving.name} runs an older llama.cpp build; restarting it")
            self._restart(serving, None)
            report["restarted"].append(serving.unit)
        for unit in restart:
            self.host.progress(f"{self.contract.units[unit].name}: its service changed")
            self._restart(self.contract.units[unit], staged[unit])
            report["restarted"].append(unit)
        if restart_companions:
            for model in restart_companions:
                self.host.progress(f"companion {model.name}: its service changed; restarting")
            self.host.stop_units(restart_companions)
            report["restarted"] += [m.unit for m in restart_companions]
        every = [m.unit for m in (*self.contract.models, *self.contract.companions)]
        enabled = self.host.systemd.enabled(every)
        if enabled:  # the boot unit starts the chosen model; no model unit starts on its own
            self.host.systemd.disable(enabled)
            report["disabled"] = enabled
        if not self.host.running():
            state = self._state()
            wanted = self.contract.find(state["desired"]) or self.contract.default
            result = self.switch(wanted.name)
            report["started"] = result["model"]
        else:
            serving = self.host.running()[0]
            report["companions"] = self.host.match_companions(serving)
            report["firewall"] = self.sync_firewall()["changed"]
        report["changed"] = any(report[k] for k in ("installed", "restarted", "removed", "started"))
        report["changed"] = report["changed"] or bool(report.get("companions", {}).get("changed"))
        report["changed"] = report["changed"] or bool(
            report.get("disabled") or report.get("firewall")
        )
        return report
