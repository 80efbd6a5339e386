"""`llamavm-switch status`: what serves, from systemd and the state, never from guesses."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from llamavm.host import gpu, http, share, store
from llamavm.host.contract import Contract
from llamavm.host.systemd import Systemd
from llamavm.host.transaction import BUSY, Host

_PROPS = ["ActiveState", "SubState", "MainPID", "ActiveEnterTimestampMonotonic", "NRestarts"]


def report(contract: Contract, systemd: Systemd) -> dict[str, Any]:
    state = store.load_state(contract.paths.state, repair=False)
    props = systemd.show([m.unit for m in contract.models], _PROPS)
    host = Host(contract, systemd=systemd)
    running = [m for m in contract.models if props.get(m.unit, {}).get("ActiveState") in BUSY]
    result: dict[str, Any] = {
        "active": running[0].name if len(running) == 1 else None,
        "running": [m.name for m in running],
        "desired": state["desired"],
        "stopped_by_operator": state["stopped"],
        "gpu": gpu.memory(),
        "transaction": _transaction(contract, state),
        "last": state["last"],
        "models": [],
    }
    for model in contract.models:
        unit = props.get(model.unit, {})
        entry: dict[str, Any] = {
            "name": model.name,
            "port": model.port,
            "unit": model.unit,
            "state": unit.get("ActiveState"),
            "loads": state["loads"].get(model.name, []),
            "load": model.load,
            "file": share.location(contract, model),
            "last_cold": state["history"].get(model.name, {}).get("cold"),
            "last_warm": state["history"].get(model.name, {}).get("warm"),
        }
        if model in running:
            entered = int(unit.get("ActiveEnterTimestampMonotonic", "0") or 0)
            entry.update(
                pid=int(unit.get("MainPID", "0") or 0),
                health=http.status_of(model.health_url),
                restarts=int(unit.get("NRestarts", "0") or 0),
                uptime_s=round(time.monotonic() - entered / 1e6, 1) if entered else None,
                binary_current=host.runs_current_build(model),
            )
        result["models"].append(entry)
    return result


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
