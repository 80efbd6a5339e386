"""Starting a transaction in its own unit and following it to its outcome — the one way one
starts, for `llamavm-switch` over SSH and the control service's privileged helper — and the
parts of a transaction run in the caller's own process (the checks alone, the drift probe,
the firewall's catch-up). Neither the CLI's nor the helper's: both use it.

On a systemd host a transaction runs in a transient unit whose ExecStopPost recovers it. In
a Compose project's llamavm-switchd container (no systemd) it runs under a supervisor process
of its own session, which outlives whoever asked (a `docker exec` that ends, a killed CLI) and
does the same: it runs the transaction as its child and recovers it when that child died
without an outcome; llamavm-switchd's next start recovers what a dead supervisor left."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
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


def supervised(contract: Contract) -> bool:
    """Do transactions run under a supervisor process (a Compose project: no systemd)?"""
    return contract.runtime is not None and contract.runtime.kind == "compose"


def supervisor_pid_path(contract: Contract, tx: str) -> Path:
    return contract.paths.progress / f"{tx}.pid"


#: Where a supervisor's own lines go: the container's log (its PID 1's output), else nowhere.
CONTAINER_LOG = Path("/proc/1/fd/1")


def launch(contract: Contract, systemd: Systemd, tx: str, op: str, args: list[str]) -> str:
    """Start transaction `tx` in its own transient unit (or under its supervisor); '' or why
    it could not start."""
    if supervised(contract):
        return _spawn(contract, tx, op, args)
    stop_timeout = max([m.health_timeout_s for m in contract.models] + [60]) * 2 + 120
    switch = str(contract.paths.switch)
    properties = [
        f"Description=llamavm transaction {tx}: {op} {' '.join(args)}".rstrip(),
        f"ExecStopPost={switch} recover {tx}",
        f"TimeoutStopSec={stop_timeout}",
        "KillMode=mixed",
    ]
    return systemd.run_transient(tx_unit(tx), [switch, "run", tx, op, *args], properties)


def _spawn(contract: Contract, tx: str, op: str, args: list[str]) -> str:
    """The supervisor of `tx`, in a session of its own; its PID where followers look."""
    store.secure_dir(contract.paths.progress, 0o755)
    try:
        log = CONTAINER_LOG.open("ab") if os.getpid() != 1 else None
    except OSError:
        log = None
    try:
        proc = subprocess.Popen(
            [str(contract.paths.switch), "supervise", tx, op, *args],
            stdin=subprocess.DEVNULL,
            stdout=log or subprocess.DEVNULL,
            stderr=log or subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        return f"cannot run {contract.paths.switch}: {exc.strerror}"
    finally:
        if log is not None:
            log.close()
    supervisor_pid_path(contract, tx).write_text(f"{proc.pid}\n")
    return ""


def supervise(
    contract: Contract,
    tx: str,
    op: str,
    args: list[str],
    run_tx: Callable[[Contract, str, str, list[str]], dict[str, Any]],
) -> int:
    """Run transaction `tx` (`run_tx`, cli.run) in a forked child — no second interpreter to
    start — and recover it if that child dies without an outcome (a systemd host's transient
    unit and its ExecStopPost, without systemd). A SIGTERM (the container stops) goes on to
    the transaction, which rolls back or defers to the next llamavm-switchd."""
    pid_path = supervisor_pid_path(contract, tx)
    with contextlib.suppress(OSError):
        pid_path.write_text(f"{os.getpid()}\n")
    child = os.fork()
    if child == 0:  # the transaction
        code = EXIT_REFUSED
        try:
            code = int(run_tx(contract, tx, op, args).get("code", EXIT_REFUSED))
        finally:
            os._exit(code)

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(OSError):
            os.kill(child, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    _, status = os.waitpid(child, 0)
    try:
        if not store.read_outcome(contract.paths.outcomes, tx):
            recover(contract, tx)
    finally:
        with contextlib.suppress(OSError):
            pid_path.unlink()
    return os.waitstatus_to_exitcode(status)


def save_outcome(
    contract: Contract, tx: str, op: str, outcome: dict[str, Any], began: float
) -> None:
    outcome.update(tx=tx, op=op, seconds=round(time.time() - began, 3), at=time.time())
    store.save_outcome(contract.paths.outcomes, tx, outcome, contract.paths.counters)


def recover(contract: Contract, tx: str) -> dict[str, Any]:
    """ExecStopPost of a transaction unit: finish it if its process died without an outcome."""
    from llamavm.host.transaction import Host, Transaction

    if store.read_outcome(contract.paths.outcomes, tx):
        return {"ok": True, "changed": False}
    progress = store.Progress(contract.paths.progress, tx)
    host = Host(contract, progress=progress)
    if host.runtime.shutting_down():  # nothing can start now: the boot finishes it
        return {"ok": True, "changed": False, "deferred": True}
    with store.locked(contract.paths.lock, contract.lock_timeout_s):
        result = Transaction(host, tx, "recover").recover("its process was killed")
    if not store.read_outcome(contract.paths.outcomes, tx):  # it died before it recorded intent
        error = "the transaction process died before it changed anything"
        save_outcome(
            contract, tx, "", {"ok": False, "code": EXIT_REFUSED, "error": error}, time.time()
        )
    return {"ok": True, **result}


def _supervisor_alive(contract: Contract, tx: str) -> bool:
    try:
        pid = int(supervisor_pid_path(contract, tx).read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    return pid > 0 and os.path.exists(f"/proc/{pid}")


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
            if supervised(contract):
                alive = _supervisor_alive(contract, tx)
            elif tx_pid and os.path.exists(f"/proc/{tx_pid}") and now - last_systemctl < 10:
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
