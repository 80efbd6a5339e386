"""llamavm-switchd: the Compose project's one way to change what serves (`llamavm-switch
switchd`, the main process of the project's `switchd` service).

It is the only container of the project that reaches the engine's socket, and it publishes no
port. At its start it finishes what a dead predecessor left (a transaction whose container
stopped or whose engine restarted: recover), then serves what the operator asked — the model
named by `MODEL` (`MODEL=qwen docker compose up -d` gives it a new environment, so Compose
starts a new switchd, which switches to qwen through the transaction: checked, health-gated,
rolled back on failure) or, without one, the chosen model when nothing serves (the systemd
host's boot). Then it serves the chosen model again whenever its container is gone (killed or
stopped by hand: systemd's Restart= has no such gap, the engine's restart policy does), and
answers the control service's helper protocol on a unix socket until it
is told to stop. `invoke switch/stop/status -i <compose inventory>` run `llamavm-switch` in this
container (`docker exec`): the same command, the same transaction, the same answers as on a
systemd host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from llamavm.host import contract as contract_mod
from llamavm.host import runner, store
from llamavm.host.contract import Contract, HostError
from llamavm.host.runtime import stopping_marker
from llamavm.host.systemd import Systemd
from llamavm.host.transaction import Host

#: The environment variable the project passes `MODEL` in as.
MODEL_ENV = "LLAMAVM_MODEL"
#: How often it looks whether the chosen model still serves, and the longest wait after a
#: failed attempt to serve it again.
WATCH_S = 5.0
#: The group of the helper socket: the control service's (its container runs as this id).
CONTROL_GID = 10001
WATCH_MAX_S = 300.0


def helper_socket(contract: Contract) -> Path:
    """Where the helper listens: the control service's socket, else one in the run directory."""
    if contract.control is not None:
        return contract.control.helper_socket
    return contract.paths.run_dir / "switchd.sock"


def _say(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(line, flush=True)


def _stop_supervisors(contract: Contract) -> None:
    """SIGTERM to every transaction's supervisor (it passes the signal on)."""
    for pid_file in contract.paths.progress.glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


def first(contract: Contract, wanted: str) -> dict[str, Any]:
    """What a new switchd does first: recover a dead predecessor's transaction, then switch to
    `wanted` (MODEL), or without one (or a name no model has) serve the chosen model when
    nothing serves. The outcome of the last transaction it ran."""
    dead = orphaned(contract)
    if dead:
        _say(f"llamavm-switchd: recovering transaction {dead} (its switchd stopped)")
        runner.recover(contract, dead)
    op, args = "boot", []
    if wanted:
        try:
            op, args = "switch", [contract.resolve(wanted).name]
        except HostError as exc:
            _say(f"llamavm-switchd: MODEL={wanted}: {exc}; serving the chosen model instead")
    # Its lines reach the log already: the transaction writes them there (runner._spawn).
    outcome = runner.start_and_follow(contract, op, args, lambda _line: None)
    if not outcome.get("ok"):
        said = f"{op} {' '.join(args)}".strip() + f": {outcome.get('error')}"
    elif outcome.get("model"):
        said = f"{outcome['model']} serves on port " + str(contract.resolve(outcome["model"]).port)
        said += "" if outcome.get("changed") else " (it served already)"
    else:
        said = f"nothing started: {outcome.get('why') or 'nothing to do'}"
    _say(f"llamavm-switchd: {said}")
    return outcome


def orphaned(contract: Contract) -> str | None:
    """The pending transaction that nothing runs any more (its processes were killed, and its
    supervisor with them): its id. A live transaction holds the switch lock throughout."""
    pending = store.load_state(contract.paths.state, repair=False).get("pending") or {}
    if not pending.get("tx"):
        return None
    try:
        with store.locked(contract.paths.lock, 0.0):
            pass
    except HostError:
        return None  # it runs (or another transaction does, and will be recovered after)
    return str(pending["tx"])


def unserved(contract: Contract, host: Host | None = None) -> bool:
    """Should a model serve that does not? Nothing runs, no transaction is under way, and the
    operator neither stopped it nor let it sleep — its container was killed or stopped by hand
    (a crash is the restart policy's: a restarting container counts as running)."""
    state = store.load_state(contract.paths.state, repair=False)
    if state["stopped"] or state["asleep"] or state["pending"]:
        return False
    return not (host or Host(contract)).running()


def watch(contract: Contract, stop: threading.Event) -> None:
    """Serve the chosen model again whenever `unserved` says so, until `stop`; after a failed
    attempt the next waits twice as long (at most WATCH_MAX_S)."""
    wait = WATCH_S
    while not stop.wait(wait):
        try:
            dead = orphaned(contract)
            if dead:
                _say(f"llamavm-switchd: transaction {dead} died with its supervisor: recovering")
                runner.recover(contract, dead)
            if not unserved(contract):
                wait = WATCH_S
                continue
            _say("llamavm-switchd: no model serves and none was stopped: serving it again")
            outcome = runner.start_and_follow(contract, "boot", [], lambda _line: None)
        except HostError as exc:
            outcome = {"ok": False, "error": str(exc)}
        if outcome.get("ok"):
            _say(f"llamavm-switchd: {outcome.get('model') or 'nothing'} serves again")
            wait = WATCH_S
        else:
            wait = min(wait * 2, WATCH_MAX_S)
            _say(f"llamavm-switchd: serving failed ({outcome.get('error')}); next try in "
                 f"{wait:.0f} s")  # fmt: skip


def sample(contract: Contract, stop: threading.Event) -> None:
    """llamavm's series for node_exporter every `metrics.interval_s` until `stop` (a host's
    systemd timer does this there); a failed sample is said once, and tried again."""
    from llamavm.host import metrics

    assert contract.metrics is not None
    said = ""
    while True:
        try:
            metrics.write(contract, Systemd())
            said = ""
        except (HostError, OSError, ValueError) as exc:
            if str(exc) != said:
                said = str(exc)
                _say(f"llamavm-switchd: metrics not written: {exc}")
        if stop.wait(contract.metrics.interval_s):
            return


def main(contract: Contract, contract_path: Path) -> int:
    """Run until SIGTERM: first(), then the helper's daemon."""
    from llamavm.host import helper

    marker = stopping_marker(contract)
    with contextlib.suppress(OSError):
        marker.unlink()
    stop = threading.Event()

    def on_term(_signum: int, _frame: Any) -> None:
        # Said first: a transaction interrupted now is left to the next switchd (it would roll
        # back into an engine that is stopping this container).
        with contextlib.suppress(OSError):
            store.secure_dir(marker.parent, 0o755)
            marker.touch()
        _stop_supervisors(contract)
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    path = helper_socket(contract)
    store.secure_dir(path.parent, 0o755)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o660)
    with contextlib.suppress(OSError):  # the control service's group (switchd is in it)
        os.chown(path, -1, CONTROL_GID)
    listener.listen(64)
    serving = threading.Thread(
        target=helper.daemon,
        args=(lambda: contract_mod.load(contract_path), listener, None, stop),
        name="helper",
        daemon=True,
    )
    serving.start()
    if contract.metrics is not None:
        threading.Thread(target=sample, args=(contract, stop), name="metrics", daemon=True).start()
    try:
        first(contract, os.environ.get(MODEL_ENV, "").strip())
    except HostError as exc:
        print(f"llamavm-switchd: {exc}", file=sys.stderr, flush=True)
    watch(contract, stop)
    serving.join(timeout=5)
    return 0
