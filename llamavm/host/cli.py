"""llamavm-switch: what a host serves — checked, health-gated, transactional, detached.

    llamavm-switch switch NAME [--json] [--tx ID]   serve NAME (name or alias); roll back on failure
    llamavm-switch stop [--json] [--tx ID]          stop whatever model runs
    llamavm-switch sleep NAME [--json] [--tx ID]    stop NAME for idleness: it stays chosen, the
                                                    next front-door or routed request wakes it
    llamavm-switch restart [--json] [--tx ID]       restart the serving model (health-gated)
    llamavm-switch apply [--json] [--tx ID]         install staged units (invoke provision runs it)
    llamavm-switch check NAME [--json]              the pre-switch checks alone, nothing stopped
    llamavm-switch drift [--json]                   what apply would change now (read-only)
    llamavm-switch status [--json]                  active model, health, uptime, loads, CPU/RAM/GPU
    llamavm-switch rotate-key [--json] [--tx ID]    a new API key; the serving model restarts
    llamavm-switch expose [--json]                  open the serving model's port in the firewall
    llamavm-switch metrics                          write the llamavm/GPU series for node_exporter
    llamavm-switch result ID [--wait S] [--json]    the outcome of transaction ID (waits for it)

switch, stop and apply run in a transient systemd unit (llamavm-tx-ID.service) that outlives
this command: if the SSH session that ran it drops, the transaction completes or rolls back on
its own, and `result ID` tells how it ended. Progress goes to stderr, best effort.

Exit codes: 0 done (or nothing to do), 1 failed and rolled back, 2 refused before anything was
stopped, 3 lock timeout, 4 rollback failed too, 5 outcome unknown, 6 still running (result).
Internal: `run` (the transaction itself), `recover` (its ExecStopPost), `boot` (the boot unit),
`gate` (each model unit's ExecStartPost health gate), `serve` (the control service's root
helper on llamavm-switchd.socket; one request on stdin without it), `control` (the control
service itself); on Compose, `switchd` (the switchd service's main process) and `supervise`
(a transaction's supervisor there, in place of its transient unit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamavm.host import (
    EXIT_FAILED,
    EXIT_REFUSED,
    TX_PATTERN,
    store,
)
from llamavm.host import (
    contract as contract_mod,
)
from llamavm.host.contract import Contract, HostError
from llamavm.host.runner import (
    follow,
    new_tx,
    recover,
    run_inline_check,
    run_inline_drift,
    run_inline_expose,
    save_outcome,
    start_and_follow,
    supervise,
)
from llamavm.host.systemd import Systemd

if TYPE_CHECKING:
    from llamavm.host.transaction import Transaction

# The transaction, the share, status and metrics are imported where they are used: the
# follower (`switch` over SSH, the control service's helper) and the health gate start on
# every switch, and needn't load what only the transaction process runs.

TX_RE = re.compile(TX_PATTERN)
MUTATING = ("switch", "stop", "restart", "apply", "rotate-key", "sleep")


# --- running a transaction (inside its transient unit) ----------------------------------------


def run(contract: Contract, tx: str, op: str, args: list[str]) -> dict[str, Any]:
    """Run transaction `tx` under the lock; always record its outcome; return it."""
    from llamavm.host.transaction import Host, Interrupted, Transaction

    paths = contract.paths
    progress = store.Progress(paths.progress, tx)
    host = Host(contract, progress=progress, failpoint=store.Failpoints(paths.failpoints))
    transaction = Transaction(host, tx, op)

    def on_signal(signum: int, _frame: Any) -> None:
        if transaction.rolling_back:
            progress(f"ignoring signal {signum} while rolling back")
            return
        raise Interrupted(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    began = time.time()
    try:
        with store.locked(
            paths.lock,
            contract.lock_timeout_s,
            waiting=lambda: progress("waiting for another llamavm transaction to finish"),
        ):
            outcome = _outcome(transaction, op, args)
            if not outcome.pop("deferred", False):
                save_outcome(contract, tx, op, outcome, began)
    except HostError as exc:  # the lock
        outcome = {"ok": False, "code": exc.code, "error": str(exc)}
        save_outcome(contract, tx, op, outcome, began)
    except Interrupted as exc:  # while waiting for the lock: nothing was touched
        outcome = {
            "ok": False,
            "code": EXIT_REFUSED,
            "error": f"interrupted by {exc} before it began",
        }
        save_outcome(contract, tx, op, outcome, began)
    return outcome


def _outcome(transaction: Transaction, op: str, args: list[str]) -> dict[str, Any]:
    from llamavm.host.transaction import Deferred

    try:
        if op == "switch":
            result = transaction.switch(args[0])
        elif op == "stop":
            result = transaction.stop()
        elif op == "sleep":
            result = transaction.sleep(args[0])
        elif op == "apply":
            result = transaction.apply()
        elif op == "rotate-key":
            result = transaction.rotate_key()
        elif op == "restart":
            result = transaction.restart()
        elif op == "boot":
            result = transaction.boot()
        elif op == "check":
            result = transaction.check(args[0])
        else:
            raise HostError(f"unknown operation {op!r}", EXIT_REFUSED)
        return {"ok": True, "code": 0, **result}
    except Deferred as exc:
        return {"ok": False, "code": exc.code, "error": str(exc), "deferred": True}
    except HostError as exc:
        return {"ok": False, "code": exc.code, "error": str(exc), "journal": exc.detail}
    except BaseException as exc:  # before any stop (after one, the transaction rolls back)
        return {
            "ok": False,
            "code": EXIT_REFUSED,
            "error": f"{type(exc).__name__}: {exc} — nothing was stopped",
        }


def _relay(line: str) -> None:
    """Progress to stderr; a closed stderr (the SSH session dropped) is not an error."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


# --- the ExecStartPost health gate -------------------------------------------------------------


def gate(contract: Contract, name: str) -> int:
    """Active only once /health answers 200; give up as soon as the server process is gone.

    Meanwhile, when the model's file isn't in the page cache (a cold start), a child reads it
    ahead of the server, so the disk or the share reads while the server does its CPU work
    instead of before it."""
    from llamavm.host import http, pagecache
    from llamavm.host.watch import poll_interval

    model = contract.resolve_any(name)
    pid = os.environ.get("MAINPID", "")
    began = time.monotonic()
    deadline = began + model.health_timeout_s
    reader = pagecache.read_ahead(model.gguf, server_pid=int(pid) if pid.isdigit() else None)
    try:
        while time.monotonic() < deadline:
            if pid and not os.path.exists(f"/proc/{pid}"):
                print(f"llamavm-gate: main process {pid} exited while loading", file=sys.stderr)
                return 1
            if http.status_of(model.health_url, timeout=2) == 200:
                return 0
            time.sleep(poll_interval(time.monotonic() - began))
        print(
            f"llamavm-gate: {model.health_url} not healthy after {model.health_timeout_s}s",
            file=sys.stderr,
        )
        return 1
    finally:
        pagecache.stop_reader(reader)


# --- the command line --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamavm-switch", description=(__doc__ or "").split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("switch", "check", "sleep"):
        p = sub.add_parser(name)
        p.add_argument("model")
        p.add_argument("--json", action="store_true")
        if name != "check":
            p.add_argument("--tx", default=None)
    for name in ("stop", "restart", "apply", "rotate-key"):
        p = sub.add_parser(name)
        p.add_argument("--json", action="store_true")
        p.add_argument("--tx", default=None)
    sub.add_parser("status").add_argument("--json", action="store_true")
    sub.add_parser("drift").add_argument("--json", action="store_true")
    sub.add_parser("expose").add_argument("--json", action="store_true")
    sub.add_parser("metrics")
    p = sub.add_parser("result")
    p.add_argument("tx")
    p.add_argument("--wait", type=float, default=0.0)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("run")
    p.add_argument("tx")
    p.add_argument("op", choices=[*MUTATING, "boot"])
    p.add_argument("args", nargs="*")
    sub.add_parser("recover").add_argument("tx")
    p = sub.add_parser("supervise")
    p.add_argument("tx")
    p.add_argument("op", choices=[*MUTATING, "boot"])
    p.add_argument("args", nargs="*")
    sub.add_parser("switchd")
    sub.add_parser("boot").add_argument("--json", action="store_true")
    sub.add_parser("gate").add_argument("model")
    sub.add_parser("serve")
    sub.add_parser("control")
    return parser


def main(argv: list[str] | None = None, contract_path: Path | None = None) -> int:
    args = _parser().parse_args(argv)
    as_json = getattr(args, "json", False)
    try:
        contract = contract_mod.load(contract_path or contract_mod.CONTRACT_PATH)
        if args.command == "gate":
            return gate(contract, args.model)
        if args.command == "status":
            from llamavm.host import status as status_mod

            return _print(status_mod.report(contract, Systemd()), args.command, as_json)
        tx = getattr(args, "tx", None)
        if tx is not None and not TX_RE.fullmatch(tx):
            raise HostError(f"{tx!r} is not a transaction id (6-32 of a-z, 0-9)", EXIT_REFUSED)
        if args.command == "run":
            outcome = run(contract, args.tx, args.op, args.args)
            return int(outcome.get("code", EXIT_FAILED))
        if args.command == "recover":
            recover(contract, args.tx)
            return 0
        if args.command == "supervise":
            return supervise(contract, args.tx, args.op, args.args, run)
        if args.command == "switchd":
            from llamavm.host import switchd

            return switchd.main(contract, contract_path or contract_mod.CONTRACT_PATH)
        if args.command == "boot":
            tx = new_tx()
            return _print(run(contract, tx, "boot", []), "boot", as_json)
        if args.command == "check":
            return _print(run_inline_check(contract, args.model), "check", as_json)
        if args.command == "drift":
            return _print(run_inline_drift(contract), "drift", as_json)
        if args.command == "expose":
            return _print(run_inline_expose(contract), "expose", as_json)
        if args.command == "metrics":
            from llamavm.host import metrics

            metrics.write(contract, Systemd())
            return 0
        if args.command == "result":
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            outcome = follow(contract, Systemd(), args.tx, args.wait, _relay)
            return _print(outcome, outcome.get("op", "result"), as_json)
        if args.command == "serve":
            from llamavm.host import helper

            fd = helper.listen_fd()
            if fd is not None:  # llamavm-switchd.socket: every connection, until replaced
                path = contract_path or contract_mod.CONTRACT_PATH
                return helper.run_daemon(path, fd, contract.paths.switch)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            return helper.serve(contract, sys.stdin.buffer, sys.stdout.buffer)
        if args.command == "control":
            from llamavm.host import control

            return control.main(contract, contract_path or contract_mod.CONTRACT_PATH)
        # switch, stop, sleep, restart, apply, rotate-key: detached, then followed
        op_args = []
        if args.command in ("switch", "sleep"):
            # An unknown name is refused before any unit starts.
            op_args = [contract.resolve(args.model).name]
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        outcome = start_and_follow(contract, args.command, op_args, _relay, args.tx)
        return _print(outcome, args.command, as_json)
    except HostError as exc:
        return _print(
            {"ok": False, "code": exc.code, "error": str(exc), "journal": exc.detail},
            args.command,
            as_json,
        )


def _print(result: dict[str, Any], command: str, as_json: bool) -> int:
    code = int(result.get("code", 0 if result.get("ok", True) else EXIT_FAILED))
    result.setdefault("ok", code == 0)
    with contextlib.suppress(OSError, ValueError):
        if as_json:
            print(json.dumps(result), flush=True)
        elif not result["ok"]:
            print(f"llamavm-switch: {result.get('error')}", file=sys.stderr, flush=True)
            if result.get("journal"):
                print(result["journal"], file=sys.stderr, flush=True)
        else:
            print(human(command, result), flush=True)
    return code


def human(command: str, result: dict[str, Any]) -> str:
    if command in ("switch", "boot") and result.get("model"):
        if not result.get("changed"):
            return f"{result['model']} is already serving"
        downtime = result.get("downtime_seconds")
        return (
            f"{result['model']} serving on port {result.get('port')} "
            f"(loaded in {result.get('load_seconds', 0):.2f}s, "
            + (f"downtime {downtime:.2f}s, " if downtime is not None else "")
            + f"switch took {result.get('switch_seconds', 0):.2f}s)"
        )
    if command == "stop":
        return "stopped " + (
            ", ".join(result.get("stopped", [])) or "nothing (no model was running)"
        )
    if command == "check":
        return f"{result['model']}: ready to serve ({result.get('load')}: {result.get('file')})"
    if command == "rotate-key":
        restarted = result.get("restarted")
        return "rotated the API key" + (f"; {restarted} serves with it" if restarted else "")
    if command == "drift":
        return "\n".join(result.get("drift") or ["no drift: apply would change nothing"])
    if command == "expose":
        ports = ", ".join(map(str, result.get("open", []))) or "no model port"
        return f"firewall: {ports} open" + ("" if result.get("changed") else " (unchanged)")
    return json.dumps(result, indent=2)


def entry() -> None:
    sys.exit(main())
