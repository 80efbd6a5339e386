"""What the control service and its privileged helper say to each other: one JSON request line
(`{"op": OP, ...}`, at most MAX_REQUEST bytes), checked before anything runs; the helper answers
with JSON lines (progress, then one outcome; see helper.py)."""

from __future__ import annotations

import json
import re
from typing import Any

from llamavm.host import EXIT_REFUSED, TX_PATTERN
from llamavm.host.contract import HostError

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


def request_line(op: str, **fields: str) -> bytes:
    """A request as the control service writes it."""
    return json.dumps({"op": op, **fields}).encode() + b"\n"
