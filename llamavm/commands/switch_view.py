"""`invoke switch`: one line per host saying what the host's transaction really did."""

from __future__ import annotations

from typing import Any

from llamavm.inputs.catalog import Model
from llamavm.ops.remote import Host


def line(host: Host, wanted: Model, code: int, answer: dict[str, Any], *, dry: bool) -> str:
    prefix = f"llamavm: {host.name}:"
    note = " (the SSH session dropped; the host finished the transaction on its own)"
    note = note if answer.get("reconnected") else ""
    if code:
        error = str(answer.get("error") or "failed")
        # Errors raised for a host name it themselves: once per line is enough.
        error = error.removeprefix(f"{host.name}: ")
        return f"{prefix} {error}{note}"
    if dry:
        running = ", ".join(answer.get("running", [])) or "nothing"
        return f"{prefix} checks pass: would stop {running} and serve {wanted.name}"
    if not answer.get("changed"):
        return f"{prefix} {wanted.name} already serving at http://{host.address}:{wanted.port}/"
    return (
        f"{prefix} {wanted.name} serving at http://{host.address}:{wanted.port}/ "
        f"({timings(answer)}){note}"
    )


def timings(answer: dict[str, Any]) -> str:
    """What a switch took: fetching the bytes (the old model still serving), the downtime
    (old model stopped -> new one healthy), and the whole switch."""
    parts = []
    fetched = answer.get("fetch") or {}
    if fetched.get("read_bytes"):
        verb = "staged" if fetched.get("from") == "share" else "read"
        parts.append(
            f"{verb} {fetched['read_bytes'] / 2**30:.2f} GiB in {fetched.get('seconds', 0):.1f}s "
            "while the old model served"
        )
    elif fetched:
        parts.append(f"bytes already local ({fetched.get('from')})")
    parts.append(f"load {answer.get('load_seconds', 0):.2f}s")
    if "downtime_seconds" in answer:
        parts.append(f"downtime {answer['downtime_seconds']:.2f}s")
    parts.append(f"switch {answer.get('switch_seconds', 0):.2f}s")
    return ", ".join(parts)
