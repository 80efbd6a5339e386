"""`llamavm-switch status`: what serves, from the runtime (systemd or the engine) and the state,
never from guesses."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from llamavm.host import fetch, gpu, http, metrics, store
from llamavm.host.contract import Contract, HostError
from llamavm.host.runtime import BUSY, UnitState
from llamavm.host.systemd import Systemd
from llamavm.host.transaction import Host


def report(contract: Contract, systemd: Systemd) -> dict[str, Any]:
    state = store.load_state(contract.paths.state, repair=False)
    host = Host(contract, systemd=systemd)
    units = host.runtime.show([*contract.models, *contract.companions])
    gpus = gpu.sample()
    running = [m for m in contract.models if units.get(m.unit, UnitState()).active in BUSY]
    result: dict[str, Any] = {
        "active": running[0].name if len(running) == 1 else None,
        "running": [m.name for m in running],
        "desired": state["desired"],
        "stopped_by_operator": state["stopped"],
        # Stopped for idleness: {"model", "at", "idle_s"}; the next request wakes it.
        "asleep": state["asleep"] if not running else None,
        "gpu": [{"used_mib": g["used_mib"], "total_mib": g["total_mib"]} for g in gpus or []],
        "gpus": gpus,
        "system": system(),
        "firewall": _firewall(host),
        "transaction": _transaction(contract, state),
        "last": state["last"],
        "models": [],
        "companions": [],
    }
    for model in contract.models:
        unit = units.get(model.unit, UnitState())
        entry: dict[str, Any] = {
            "name": model.name,
            "port": model.port,
            "unit": model.unit,
            "state": unit.active or None,
            "idle_unload_s": model.idle_unload_s,
            # Its slots saved at its last stop (restored at its next start): {slot: tokens}.
            "prompt_cache": (state["slots"].get(model.name) or {}).get("slots")
            if model.slot_dir
            else None,
            "loads": state["loads"].get(model.name, []),
            "load": model.load,
            "file": fetch.location(contract, model),
            "last_cold": state["history"].get(model.name, {}).get("cold"),
            "last_warm": state["history"].get(model.name, {}).get("warm"),
        }
        if model in running:
            entry.update(
                pid=unit.pid,
                health=http.status_of(model.health_url),
                restarts=unit.restarts,
                uptime_s=unit.uptime_s,
                binary_current=host.runs_current_build(model),
            )
            stats = metrics.process_stats(entry["pid"]) if entry["pid"] else None
            if stats:
                entry.update(rss_mib=round(stats[0] / metrics.MIB), cpu_s=round(stats[1], 1))
        result["models"].append(entry)
    active = running[0] if len(running) == 1 else None
    for model in contract.companions:
        unit = units.get(model.unit, UnitState())
        busy = unit.active in BUSY
        entry = {
            "name": model.name,
            "task": model.task,
            "port": model.port,
            "unit": model.unit,
            "state": unit.active or None,
            "health": http.status_of(model.health_url) if busy else None,
            # Beside the model that serves, per the VRAM admission (or why not).
            "admitted": active is not None and model.name in active.companions,
            "why_not": active.companions_stopped.get(model.name) if active else None,
        }
        if busy:
            entry["pid"] = unit.pid
            stats = metrics.process_stats(entry["pid"]) if entry["pid"] else None
            if stats:
                entry.update(rss_mib=round(stats[0] / metrics.MIB), cpu_s=round(stats[1], 1))
        result["companions"].append(entry)
    return result


def _firewall(host: Host) -> dict[str, Any] | None:
    """Whether the firewall is on, and which model ports it lets in."""
    if host.contract.firewall is None:
        return None
    if host.active_firewall() is None:
        return {"active": False, "open": []}
    try:
        return {"active": True, "open": host.firewall_state(host.contract.firewall)}
    except HostError as exc:
        return {"active": True, "open": [], "error": str(exc)}


def system() -> dict[str, Any]:
    """CPUs, load average and memory of the host."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "load": [round(x, 2) for x in os.getloadavg()]}
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = {
            line.split(":")[0]: int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
        }
        info["mem_total_mib"] = meminfo["MemTotal"] // 1024
        info["mem_available_mib"] = meminfo["MemAvailable"] // 1024
    return info


def _transaction(contract: Contract, state: dict[str, Any]) -> dict[str, Any] | None:
    """The transaction in flight, with its last progress line, if any."""
    pending = state.get("pending")
    if not pending:
        return None
    info = {k: pending.get(k) for k in ("tx", "op", "target", "previous", "started")}
    with contextlib.suppress(OSError):
        lines = store.progress_path(contract.paths.progress, str(pending.get("tx"))).read_text()
        info["phase"] = (lines.strip().splitlines() or [""])[-1]
    return info
