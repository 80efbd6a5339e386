"""The container engine's API (Docker's; Podman serves the same one) over its unix socket: the
few calls the Compose runtime makes on one project's model containers — list, inspect, start,
stop, logs and a one-shot look at a container's CPU and I/O. Standard library only, like the
rest of the host package; no call creates a container, mounts a path or runs a command.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any

from llamavm.host.contract import HostError

#: The engine's default socket (the contract's runtime section may name another).
DEFAULT_SOCKET = "/run/docker.sock"


class EngineError(HostError):
    """The engine refused a call, or could not be reached."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class EngineApi:
    """The engine at `socket_path`; every call a connection of its own (the engine keeps none
    of our state between them)."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 60.0) -> None:
        self.socket_path, self.timeout = socket_path, timeout

    def call(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) of one request; EngineError when the engine can't be reached."""
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        conn = _UnixConnection(self.socket_path, timeout or self.timeout)
        try:
            conn.request(method, target, headers={"Host": "docker"})
            answer = conn.getresponse()
            return answer.status, answer.read()
        except OSError as exc:
            raise EngineError(f"the container engine at {self.socket_path}: {exc}") from None
        finally:
            conn.close()

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        status, body = self.call(method, path, **kwargs)
        if status == 404:
            return None
        if status >= 300:
            raise EngineError(f"{method} {path}: the engine answered {status}: {_message(body)}")
        return json.loads(body or b"null")

    def containers(self, label: str) -> list[dict[str, Any]]:
        """Every container (running or not) that carries `label` (KEY or KEY=VALUE)."""
        filters = json.dumps({"label": [label]})
        return self._json("GET", "/containers/json", query={"all": "1", "filters": filters}) or []

    def inspect(self, name: str) -> dict[str, Any] | None:
        """The container called `name`; None when there is none."""
        return self._json("GET", f"/containers/{_quote(name)}/json")

    def start(self, name: str) -> str:
        """Start it: '' when it runs (or already ran), else what the engine said."""
        status, body = self.call("POST", f"/containers/{_quote(name)}/start")
        if status in (204, 304):
            return ""
        return f"the engine answered {status}: {_message(body)}"

    def stop(self, name: str, grace_s: int = 30) -> None:
        """Stop it (SIGTERM, SIGKILL after `grace_s`); returns once it has stopped."""
        status, body = self.call(
            "POST", f"/containers/{_quote(name)}/stop", query={"t": str(grace_s)},
            timeout=grace_s + self.timeout,
        )  # fmt: skip
        if status not in (204, 304, 404):
            raise EngineError(f"stopping {name}: the engine answered {status}: {_message(body)}")

    def logs(self, name: str, lines: int = 25) -> str:
        """The last `lines` lines it wrote (standard output and errors together)."""
        query = {"stdout": "1", "stderr": "1", "tail": str(lines)}
        status, body = self.call("GET", f"/containers/{_quote(name)}/logs", query=query)
        if status >= 300:
            return f"(no logs: the engine answered {status}: {_message(body)})"
        return demux(body).decode(errors="replace")

    def usage(self, name: str) -> tuple[int, ...] | None:
        """(CPU nanoseconds, bytes read) of its processes now, from one look at its stats;
        None when it does not run."""
        query = {"stream": "false", "one-shot": "true"}
        stats = self._json("GET", f"/containers/{_quote(name)}/stats", query=query)
        if not isinstance(stats, dict):
            return None
        cpu = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
        if not cpu:
            return None
        io = (stats.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
        read = sum(int(e.get("value", 0)) for e in io if str(e.get("op", "")).lower() == "read")
        return (int(cpu), read)


def demux(body: bytes) -> bytes:
    """A container's log stream without the engine's frame headers (8 bytes: the stream, three
    zero bytes, the frame's length); a container with a TTY sends plain bytes."""
    out, at = bytearray(), 0
    while len(body) - at >= 8 and body[at] in (0, 1, 2) and body[at + 1 : at + 4] == b"\0\0\0":
        size = int.from_bytes(body[at + 4 : at + 8], "big")
        out += body[at + 8 : at + 8 + size]
        at += 8 + size
    return bytes(out) + body[at:]


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:300]
    return str(data.get("message", data))[:300] if isinstance(data, dict) else str(data)[:300]
