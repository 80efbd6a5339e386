"""The privileged half of the control service: one request per connection on a unix socket.

systemd's llamavm-switchd.socket (root:llamavm-control, 0660, Accept=yes) starts one
`llamavm-switch serve` per connection, as root, with the connection as stdin and stdout. The
control service (unprivileged, on the LAN) writes one JSON request line; this answers with JSON
lines: `{"event": "progress", "message": ...}` while a transaction runs, then one
`{"event": "outcome", ...}` — the same outcome `llamavm-switch` prints with --json.

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
import re
import signal
from typing import IO, Any

from llamavm.host import EXIT_REFUSED, TX_PATTERN
from llamavm.host import status as status_mod
from llamavm.host.contract import Contract, HostError
from llamavm.host.systemd import Systemd

#: A request is one short line; anything longer is refused unread.
MAX_REQUEST = 4096
TX_RE = re.compile(TX_PATTERN)
OPS = ("status", "switch", "stop", "restart", "check", "result", "sleep")


def parse(line: bytes) -> dict[str, Any]:
    """The request in `line`, checked: its op, and a model name or tx id where one is needed."""
    if not line.endswith(b"\n") or len(line) > MAX_REQUEST:
        raise HostError(f"a request is one JSON line of at most {MAX_REQUEST} bytes", EXIT_REFUSED)
    try:
        request = json.loads(line)
    except ValueError:
        raise HostError("the request is not JSON", EXIT_REFUSED) from None
    if not isinstance(request, dict) or request.get("op") not in OPS:
        raise HostError(f"the request needs an op, one of: {', '.join(OPS)}", EXIT_REFUSED)
    for key in ("model", "tx"):
        if key in request and not isinstance(request[key], str):
            raise HostError(f"{key} must be a string", EXIT_REFUSED)
    if request["op"] in ("switch", "check", "sleep") and not request.get("model"):
        raise HostError(f"{request['op']} needs a model", EXIT_REFUSED)
    if request["op"] == "result" and not request.get("tx"):
        raise HostError("result needs a tx", EXIT_REFUSED)
    if "tx" in request and not TX_RE.fullmatch(request["tx"]):
        raise HostError(f"{request['tx'][:40]!r} is not a transaction id", EXIT_REFUSED)
    return request


def serve(contract: Contract, reader: IO[bytes], writer: IO[bytes]) -> int:
    """Answer the one request on `reader`: 0 once answered. The outcome's code travels in the
    answer: a refused switch is the caller's news, not a failed llamavm-switchd@ instance
    (which would leave the host's systemd degraded)."""
    from llamavm.host import cli  # the CLI's launch/follow: one implementation

    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
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
        request = parse(reader.readline(MAX_REQUEST + 1))
        op = request["op"]
        if op == "status":
            outcome: dict[str, Any] = {"ok": True, **status_mod.report(contract, Systemd())}
        elif op == "check":
            outcome = cli.run_inline_check(contract, request["model"])
        elif op == "result":
            outcome = cli.follow(contract, Systemd(), request["tx"], 0.0, lambda _line: None)
        else:
            args = [contract.resolve(request["model"]).name] if op in ("switch", "sleep") else []
            outcome = cli.start_and_follow(
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


def request_line(op: str, **fields: str) -> bytes:
    """A request as the control service writes it."""
    return json.dumps({"op": op, **fields}).encode() + b"\n"
