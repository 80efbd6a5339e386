"""`invoke switch` and `invoke stop` through the host's control service, SSH where it can't be.

The control service (llamavm/host/control.py) runs the very transaction `llamavm-switch` runs
over SSH, so reaching it over HTTP saves the SSH session, sudo and the follower's start (about
half a second of a one-second switch) and changes nothing else: the same progress lines go to
stderr as they come (server-sent events), the same recorded outcome comes back, the same exit
codes follow from it. The controller names the transaction (?tx=ID), so when the connection
breaks mid-way it asks the host over SSH how that transaction ended, as the SSH path does.

With the key policy on, the key is fetched over SSH once (`sudo cat` of the catalog's key file)
and kept on the controller in $LLAMAVM_STATE/keys/ (0600, its folder 0700); a 401 (the key was
rotated) fetches it again once. SSH is used instead, before anything was sent, when the catalog
has no control service, the host is reached through a jump host, LLAMAVM_SWITCH_VIA=ssh is
set, the port does not answer within CONNECT_S (not provisioned yet, a firewall), the key is
refused twice, or the service does not know the request (an older host).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import secrets
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamavm import paths
from llamavm.inputs.catalog import Settings
from llamavm.ops import remote

#: How long the control port may take to accept a connection before SSH is used instead.
CONNECT_S = 2.0
#: $LLAMAVM_SWITCH_VIA: auto (the API when it answers, else SSH), ssh, or api (no fallback).
VIA_ENV = "LLAMAVM_SWITCH_VIA"
_JUMPS = ("proxyjump", "proxycommand")


class Unusable(Exception):
    """The API can't take this request, and nothing was started: use SSH. `quiet`: nothing
    worth a line when SSH takes over (the port is closed: no control service there yet)."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


def via() -> str:
    value = os.environ.get(VIA_ENV, "auto").strip().lower() or "auto"
    return value if value in ("auto", "ssh", "api") else "auto"


def usable(host: remote.Host, settings: Settings) -> bool:
    """Whether to try the control API for `host` at all."""
    if via() == "ssh" or not settings.control.enabled:
        return False
    args = " ".join(host.ssh_args).lower()
    return not (any(j in args for j in _JUMPS) or "-J" in host.ssh_args)


def transaction(
    host: remote.Host, settings: Settings, op: str, args: list[str], *, stream: bool
) -> tuple[int, dict[str, Any]]:
    """Run `op` (switch MODEL, stop) on `host`: (exit code, its recorded outcome) — through the
    control API when it takes the request, else over SSH (remote.transaction)."""
    if usable(host, settings):
        try:
            return _api_transaction(host, settings, op, args, stream=stream)
        except Unusable as why:
            if via() == "api":
                return 5, {"ok": False, "code": 5, "error": f"{why} ({VIA_ENV}=api)"}
            if not why.quiet:
                how = "through the engine (docker exec)" if host.via else "over SSH"
                _note(f"llamavm: {host.name}: {why}; switching {how} instead")
    return remote.transaction(host, op, args, stream=stream)


def _api_transaction(
    host: remote.Host, settings: Settings, op: str, args: list[str], *, stream: bool
) -> tuple[int, dict[str, Any]]:
    tx = secrets.token_hex(6)
    path = f"/{op}?stream=true&tx={tx}"
    body = {"model": args[0]} if op == "switch" else None
    key = _key(host, settings, refresh=False)
    for attempt in (1, 2):
        try:
            conn, response = _post(host, settings.control.port, path, body, key)
        except _SendBroken:
            return _follow(host, op, tx, iter(()), stream=stream)
        if response.status != 401:
            break
        conn.close()
        if attempt == 2 or key is None:
            raise Unusable("the control API refused the API key")
        key = _key(host, settings, refresh=True)
    try:
        if response.status == 404 and op == "switch":
            detail = _detail(response)
            if detail.startswith("no model named"):
                return 2, {"ok": False, "code": 2, "error": detail}
            raise Unusable(f"the control API answered 404 ({detail[:120]})")
        if response.status != 200:
            raise Unusable(f"the control API answered {response.status} {response.reason}")
        return _follow(host, op, tx, _events(response), stream=stream)
    finally:
        conn.close()


def _follow(
    host: remote.Host,
    op: str,
    tx: str,
    events: Iterator[tuple[str, dict[str, Any]]],
    *,
    stream: bool,
) -> tuple[int, dict[str, Any]]:
    progressed = False
    try:
        for kind, data in events:
            if kind == "progress":
                progressed = True
                if stream:
                    _note(str(data.get("message", "")))
            elif kind == "outcome":
                code = int(data.get("code", 0 if data.get("ok", True) else 1))
                helper_lost = code == 5 and "privileged helper" in str(data.get("error"))
                if helper_lost and not progressed:
                    raise Unusable("the control service could not reach its helper")
                if helper_lost:  # it went away mid-way (a provision restarts it): ask the host
                    break
                return code, data
    except (OSError, http.client.HTTPException, ValueError):
        pass
    _note(
        f"llamavm: {host.name}: the control API's stream ended before {op} reported; "
        f"asking the host how transaction {tx} ended"
    )
    return remote.outcome(host, tx, stream=stream)


def _post(
    host: remote.Host, port: int, path: str, body: dict[str, Any] | None, key: str | None
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(host.address, port, timeout=CONNECT_S)
    try:
        conn.connect()
    except OSError as exc:
        conn.close()
        raise Unusable(
            f"the control API at {host.address}:{port} did not answer ({exc})", quiet=True
        ) from exc
    sock = conn.sock
    assert sock is not None
    # A switch may load for minutes without a word: no read timeout, but a dead peer is found
    # by TCP keepalives within about 15 s (as ssh's ServerAliveInterval does on the SSH path).
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    headers = {"Accept": "text/event-stream", "Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    payload = json.dumps(body).encode() if body is not None else b""
    try:
        conn.request("POST", path, body=payload, headers=headers)
        return conn, conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        # Sent, maybe: the transaction may have started, so this is no place to start another.
        raise _SendBroken(str(exc)) from exc


class _SendBroken(Exception):
    pass


def _events(response: http.client.HTTPResponse) -> Iterator[tuple[str, dict[str, Any]]]:
    """Server-sent events: (event, data as JSON)."""
    kind, data = "message", []
    while True:
        raw = response.readline(1 << 20)
        if not raw:
            return
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def _detail(response: http.client.HTTPResponse) -> str:
    try:
        answer = json.loads(response.read(1 << 16) or b"{}")
    except ValueError:
        return ""
    detail = answer.get("detail") if isinstance(answer, dict) else None
    return detail if isinstance(detail, str) else ""


# --------------------------------------------------------------------------- the key


def key_dir() -> Path:
    return paths.keys()


def _key_path(host: remote.Host) -> Path:
    digest = hashlib.sha256(f"{host.name}\0{host.address}".encode()).hexdigest()[:24]
    return key_dir() / digest


def forget_key(host: remote.Host) -> None:
    """Drop the cached key of `host` (after a rotation)."""
    _key_path(host).unlink(missing_ok=True)


def _key(host: remote.Host, settings: Settings, *, refresh: bool) -> str | None:
    if settings.api_key.policy != "required":
        return None
    path = _key_path(host)
    if not refresh:
        try:
            key = path.read_text(encoding="utf-8").strip()
            if key:
                return key
        except OSError:
            pass
    read = remote.run(host, ["cat", host.key_file or settings.api_key.file], stream=False,
                      timeout=60)  # fmt: skip
    key = read.stdout.strip() if read.returncode == 0 else ""
    if not key or any(c.isspace() for c in key):
        # The SSH path says what is wrong with the host, in its own words.
        raise Unusable(f"could not read the API key over SSH (exit {read.returncode})", quiet=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key + "\n")
    os.replace(tmp, path)
    return key


def _note(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)
