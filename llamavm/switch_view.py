"""`invoke switch`: one line per host saying what the host's transaction really did."""

from __future__ import annotations

from typing import Any

from llamavm.catalog import Model
from llamavm.remote import Host


def line(host: Host, wanted: Model, code: int, answer: dict[str, Any], *, dry: bool) -> str:
    prefix = f"llamavm: {host.name}:"
    note = " (the SSH session dropped; the host finished the transaction on its own)"
    note = note if answer.get("reconnected") else ""
    if code:
        return f"{prefix} {answer.get('error') or 'failed'}{note}"
    if dry:
        running = ", ".join(answer.get("running", [])) or "nothing"
        return f"{prefix} checks pass: would stop {running} and serve {wanted.name}"
    if not answer.get("changed"):
        return f"{prefix} {wanted.name} already serving at http://{host.address}:{wanted.port}/"
    load, took = answer.get("load_seconds", 0), answer.get("switch_seconds", 0)
    return (
        f"{prefix} {wanted.name} serving at http://{host.address}:{wanted.port}/ "
        f"(load {load:.2f}s, switch {took:.2f}s){note}"
    )
