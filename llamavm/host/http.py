"""A minimal HTTP/1.0 client for the model server on this host.

urllib costs ~50 ms of imports per run, and a switch is measured in milliseconds. Every failure
to get an answer raises OSError (refused, reset, timed out, not HTTP), so callers have one
exception to handle.
"""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit

#: Most bytes read from one answer (the server's /props is a few KiB).
MAX_ANSWER = 4 * 1024 * 1024


def request(
    url: str, body: dict[str, Any] | None = None, key: str | None = None, timeout: float = 5
) -> tuple[int, Any]:
    """GET (or POST `body` as JSON) `url`; (status, parsed JSON or text)."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    if not host or not port:
        raise OSError(f"not a host:port URL: {url}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    payload = json.dumps(body).encode() if body is not None else b""
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = [
        f"{'POST' if body is not None else 'GET'} {path} HTTP/1.0",
        f"Host: {netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
    ]
    if key:
        head.append(f"Authorization: Bearer {key}")
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        chunks, size = [], 0
        while chunk := conn.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER:
                raise OSError(f"answer from {url} is larger than {MAX_ANSWER} bytes")
    raw = b"".join(chunks)
    header, _, content = raw.partition(b"\r\n\r\n")
    try:
        status = int(header.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise OSError(f"not an HTTP answer from {url}") from None
    try:
        return status, json.loads(content or b"null")
    except ValueError:
        return status, content.decode(errors="replace")


def status_of(url: str, timeout: float = 2) -> int | None:
    """The HTTP status `url` answers with, or None when nothing answers."""
    try:
        return request(url, timeout=timeout)[0]
    except OSError:
        return None
