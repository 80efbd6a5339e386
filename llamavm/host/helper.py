"""The privileged half of the control service: one request per connection on a unix socket.

systemd's llamavm-switchd.socket (root:llamavm-control, 0660) starts `llamavm-switch serve`
once, as root, and hands it the listening socket (LISTEN_FDS); it stays up and answers each
connection in a thread of its own, so a switch asked for over the API pays no interpreter start
for the helper (it used to be one process per connection: ~0.1 s of every switch here). It
exits, to be started again by the socket at the next connection, once the host package it runs
from was replaced (a provision) and nothing is in flight. Without LISTEN_FDS, `serve` answers
the one request on stdin and stdout. The control service (unprivileged, on the LAN) writes one
JSON request line; this answers with JSON lines: `{"event": "progress", "message": ...}`
while a transaction runs, then one `{"event": "outcome", ...}` — the same outcome
`llamavm-switch` prints with --json.

Requests: {"op": "status"} · {"op": "switch", "model": NAME} · {"op": "stop"} ·
{"op": "restart"} · {"op": "sleep", "model": NAME} (the idle timer) · {"op": "check", "model":
NAME} · {"op": "result", "tx": ID}. switch, stop, sleep and restart may name their transaction
id ("tx"), so a caller whose connection breaks can ask for that transaction's outcome.
switch, stop, sleep and restart run exactly as `llamavm-switch switch/stop/...` do: in their own
transient unit, under the switch lock, so they finish (or roll back) even when the caller goes
away mid-way. Nothing else is accepted; a malformed request gets an outcome with code 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from llamavm.host import EXIT_REFUSED, runner
from llamavm.host import status as status_mod
from llamavm.host.contract import Contract, HostError
from llamavm.host.protocol import MAX_REQUEST, parse
from llamavm.host.systemd import Systemd

#: How long a connection may take to send its request line, and a write may block.
REQUEST_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 60.0
#: Connections answered at once (the socket's Accept=yes used to cap it at MaxConnections).
MAX_CONNECTIONS = 32
#: systemd's first passed file descriptor (sd_listen_fds).
LISTEN_FDS_START = 3


def serve(contract: Contract, reader: IO[bytes], writer: IO[bytes]) -> int:
    """Answer the one request on `reader`: 0 once answered. The outcome's code travels in the
    answer: a refused switch is the caller's news, not a failed llamavm-switchd@ instance
    (which would leave the host's systemd degraded)."""
    gone = False

    def emit(event: str, payload: dict[str, Any]) -> None:
        nonlocal gone
        if gone:
            return
        try:
            writer.write(json.dumps({"event": event, **payload}).encode() + b"\n")
            writer.flush()
        except (OSError, ValueError):  # the caller went away: the transaction goes on
            gone = True

    try:
        try:
            line = reader.readline(MAX_REQUEST + 1)
        except OSError as exc:  # the request line never came (REQUEST_TIMEOUT_S)
            raise HostError(f"no request line ({exc})", EXIT_REFUSED) from None
        request = parse(line)
        op = request["op"]
        if op == "status":
            outcome: dict[str, Any] = {"ok": True, **status_mod.report(contract, Systemd())}
        elif op == "check":
            outcome = runner.run_inline_check(contract, request["model"])
        elif op == "result":
            outcome = runner.follow(contract, Systemd(), request["tx"], 0.0, lambda _line: None)
        else:
            args = [contract.resolve(request["model"]).name] if op in ("switch", "sleep") else []
            outcome = runner.start_and_follow(
                contract,
                op,
                args,
                lambda line: emit("progress", {"message": line}),
                tx=request.get("tx"),
            )
    except HostError as exc:
        outcome = {"ok": False, "code": exc.code, "error": str(exc)}
    outcome.setdefault("code", 0 if outcome.get("ok", True) else 1)
    outcome.setdefault("ok", outcome["code"] == 0)
    emit("outcome", outcome)
    with contextlib.suppress(OSError):
        writer.close()
    return 0


def listen_fd() -> int | None:
    """The listening socket systemd passed (socket activation), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    return LISTEN_FDS_START


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def answer(load: Callable[[], Contract], conn: socket.socket) -> None:
    """One connection of the daemon: its request answered, the connection closed."""
    conn.settimeout(REQUEST_TIMEOUT_S)
    reader, writer = conn.makefile("rb"), conn.makefile("wb")
    try:
        try:
            contract = load()
        except HostError as exc:
            outcome = {"event": "outcome", "ok": False, "code": exc.code, "error": str(exc)}
            with contextlib.suppress(OSError):
                writer.write(json.dumps(outcome).encode() + b"\n")
                writer.flush()
        else:
            serve(contract, _Timed(reader, conn), writer)
        # What the caller sent and this did not read (an oversized line, a request after a
        # contract that would not load) is read before closing: a unix socket closed with
        # unread bytes resets, and the caller would lose the answer.
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(1.0)
            while conn.recv(65536):
                pass
    finally:
        for handle in (reader, writer, conn):
            with contextlib.suppress(OSError):
                handle.close()


def _busy(conn: socket.socket) -> None:
    """The answer past MAX_CONNECTIONS: refused before anything runs, so retrying is safe."""

    def refuse() -> Contract:
        error = f"the helper answers {MAX_CONNECTIONS} requests at once — retry"
        raise HostError(error, EXIT_REFUSED)

    answer(refuse, conn)


class _Timed:
    """The request line under REQUEST_TIMEOUT_S; the answer's writes under WRITE_TIMEOUT_S."""

    def __init__(self, reader: IO[bytes], conn: socket.socket) -> None:
        self.reader, self.conn = reader, conn

    def readline(self, size: int = -1) -> bytes:
        line = self.reader.readline(size)
        self.conn.settimeout(WRITE_TIMEOUT_S)
        return line


def daemon(
    load: Callable[[], Contract],
    listener: socket.socket,
    package: Path | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Answer every connection on `listener`, each in its own thread, until `stop` is set or
    `package` (the code this runs) was replaced and nothing is in flight: 0."""
    stop = stop or threading.Event()
    started = _stamp(package) if package else None
    lock = threading.Lock()
    in_flight = 0
    listener.settimeout(1.0)

    def handle(conn: socket.socket) -> None:
        nonlocal in_flight
        try:
            answer(load, conn)
        except Exception as exc:  # one request's failure is logged; the daemon goes on
            failed = f"{type(exc).__name__}: {exc}"
            print(f"llamavm-switchd: a request failed: {failed}", file=sys.stderr)
        finally:
            with lock:
                in_flight -= 1

    while not stop.is_set():
        if package and _stamp(package) != started:
            with lock:
                idle = in_flight == 0
            if idle:
                print("llamavm-switchd: the host package was replaced: exiting", file=sys.stderr)
                return 0
        try:
            conn, _ = listener.accept()
        except (TimeoutError, InterruptedError):
            continue
        except OSError as exc:  # out of descriptors, an aborted connection: the others go on
            print(f"llamavm-switchd: accept failed: {exc}", file=sys.stderr)
            stop.wait(0.1)
            continue
        with lock:
            full = in_flight >= MAX_CONNECTIONS
            in_flight += 0 if full else 1
        work = _busy if full else handle
        threading.Thread(target=work, args=(conn,), name="request", daemon=True).start()
    return 0


def run_daemon(contract_path: Path, fd: int, package: Path | None) -> int:
    """`llamavm-switch serve` under socket activation: the listener systemd passed."""
    # Everything a request may run is loaded now: the package is a zip read by path, and a
    # provision replaces it (the daemon then finishes what is in flight and exits).
    from llamavm.host import checks, http, share, transaction, watch  # noqa: F401
    from llamavm.host import contract as contract_mod

    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    listener = socket.socket(fileno=fd)
    return daemon(lambda: contract_mod.load(contract_path), listener, package, stop)
