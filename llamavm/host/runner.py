"""Starting a transaction in its own unit and following it to its outcome — the one way one
starts, for `llamavm-switch` over SSH and the control service's privileged helper — and the
parts of a transaction run in the caller's own process (the checks alone, the drift probe,
the firewall's catch-up). Neither the CLI's nor the helper's: both use it."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from llamavm.host import EXIT_REFUSED, EXIT_RUNNING, EXIT_UNKNOWN, store
from llamavm.host.contract import Contract, HostError
from llamavm.host.systemd import Systemd

#: How long a follower waits for `recover` after the transaction's unit vanished.
RECOVER_GRACE_S = 60.0


def new_tx() -> str:
    return secrets.token_hex(6)


def tx_unit(tx: str) -> str:
    return f"llamavm-tx-{tx}.service"


# --- launching and following (the SSH side) --------------------------------------------------


def launch(contract: Contract, systemd: Systemd, tx: str, op: str, args: list[str]) -> str:
    """Start transaction `tx` in its own transient unit; '' or why it could not start."""
    stop_timeout = max([m.health_timeout_s for m in contract.models] + [60]) * 2 + 120
    switch = str(contract.paths.switch)
    properties = [
        f"Description=llamavm transaction {tx}: {op} {' '.join(args)}".rstrip(),
        f"ExecStopPost={switch} recover {tx}",
        f"TimeoutStopSec={stop_timeout}",
        "KillMode=mixed",
    ]
    return systemd.run_transient(tx_unit(tx), [switch, "run", tx, op, *args], properties)


def start_and_follow(
    contract: Contract,
    op: str,
    args: list[str],
    relay: Callable[[str], None],
    tx: str | None = None,
) -> dict[str, Any]:
    """Run `op` as a new transaction in its own unit and follow it to its outcome.

    The one way a transaction starts, for `llamavm-switch` over SSH and the control service."""
    tx = tx or new_tx()
    if (
        store.read_outcome(contract.paths.outcomes, tx)
        or store.progress_path(contract.paths.progress, tx).exists()
    ):
        raise HostError(f"transaction id {tx} was used before — use a new one", EXIT_REFUSED)
    systemd = Systemd()
    error = launch(contract, systemd, tx, op, args)
    if error:
        raise HostError(f"could not start the transaction unit: {error}", EXIT_REFUSED)
    return follow(contract, systemd, tx, float("inf"), relay)


def follow(
    contract: Contract,
    systemd: Systemd,
    tx: str,
    wait_s: float,
    relay: Callable[[str], None],
) -> dict[str, Any]:
    """Relay progress of `tx` and return its outcome — or 'running'/'unknown' when none came."""
    from llamavm.host.watch import poll_interval

    paths = contract.paths
    log = store.progress_path(paths.progress, tx)
    offset = 0
    began = time.monotonic()
    deadline = began + wait_s
    gone_since: float | None = None
    next_unit_check = last_systemctl = 0.0
    tx_pid = 0  # the transaction's process, once systemd told it

    def drain() -> None:
        nonlocal offset
        with contextlib.suppress(OSError), log.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            offset += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                relay(line)

    while True:
        drain()
        outcome = store.read_outcome(paths.outcomes, tx)
        if outcome is not None:
            drain()
            return outcome
        now = time.monotonic()
        # A long transaction (a big load) is followed less often: systemctl is a fork, and the
        # follower's polling took CPU from the very load it waited for (under TCG, 2 vCPUs: a
        # tenth of a 1 GiB load's speed).
        elapsed = now - began
        if now >= next_unit_check:
            next_unit_check = now + max(0.5, min(2.0, elapsed / 20))
            # While the transaction's process lives (seen in /proc, no fork) the unit does;
            # systemctl (a fork and an exec, CPU taken from the load the transaction waits on)
            # only when it is gone or unknown, and every 10 s anyway.
            if tx_pid and os.path.exists(f"/proc/{tx_pid}") and now - last_systemctl < 10:
                alive = True
            else:
                last_systemctl = now
                props = systemd.props(tx_unit(tx), "ActiveState", "LoadState", "MainPID")
                alive = props.get("LoadState") == "loaded" and props.get("ActiveState") in (
                    "active",
                    "activating",
                    "deactivating",
                )
                tx_pid = int(props.get("MainPID", "0") or 0) if alive else 0
            if alive:
                gone_since = None
            elif gone_since is None:
                gone_since = now
            elif now - gone_since > _grace(contract, tx):
                return {
                    "ok": False,
                    "code": EXIT_UNKNOWN,
                    "tx": tx,
                    "error": f"no transaction {tx} runs on this host and none recorded an "
                    "outcome — it never started, or died; see 'llamavm-switch status'",
                }
        if now > deadline:
            return {
                "ok": False,
                "code": EXIT_RUNNING,
                "tx": tx,
                "state": "running",
                "error": f"transaction {tx} still runs",
            }
        time.sleep(max(0.02, poll_interval(elapsed)))


def _grace(contract: Contract, tx: str) -> float:
    """How long to wait for an outcome after the unit is gone: long if recovery is due."""
    pending = store.load_state(contract.paths.state, repair=False).get("pending") or {}
    return RECOVER_GRACE_S if pending.get("tx") == tx else 2.0


def run_inline_check(contract: Contract, name: str) -> dict[str, Any]:
    """The pre-switch checks under the lock (they may write the sha256 cache); nothing stops."""
    from llamavm.host.transaction import Host, Transaction

    host = Host(contract, progress=store.Progress(None, ""))
    with store.locked(contract.paths.lock, contract.lock_timeout_s):
        return {"ok": True, "code": 0, **Transaction(host, new_tx(), "check").check(name)}


def run_inline_drift(contract: Contract) -> dict[str, Any]:
    """What apply would change (the drift probe's hook): read-only, so no lock."""
    from llamavm.host.transaction import Host, Transaction

    host = Host(contract, progress=store.Progress(None, ""))
    drift = Transaction(host, new_tx(), "drift").drift()
    return {"ok": True, "code": 0, "changed": False, "drift": drift}


def run_inline_expose(contract: Contract) -> dict[str, Any]:
    """The firewall follows what serves (the expose role runs this after loading it)."""
    from llamavm.host.transaction import Host, Transaction

    host = Host(contract, progress=store.Progress(None, ""))
    with store.locked(contract.paths.lock, contract.lock_timeout_s):
        return {"ok": True, "code": 0, **Transaction(host, new_tx(), "expose").sync_firewall()}
