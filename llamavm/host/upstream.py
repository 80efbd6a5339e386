"""HTTP/1.1 to the model servers on this host, lean: the control service's transport for httpx.

The routing endpoint relays every token of every stream, so what it costs per request and per
chunk is what it costs the model (on a CPU-bound host the same cores compute the tokens).
httpx's own transport (httpcore, h11, anyio) spends more per chunk than the relay itself, and
checks every kept connection on every request. This one speaks just what llama-server speaks:
a request with its body, an answer with Content-Length or chunked, kept-alive connections.

- Connections are kept per host and port for `idle_s` (below llama-server's 5 s, when it closes
  an idle one), at most `keep` of them; one the server closed meanwhile is never used.
- A request that got no answer on a kept connection (the server closed it just then) is sent
  once more on a new one: nothing was answered, so nothing was done twice.
- A refused connection raises httpx.ConnectError; a connection lost before the answer's head,
  httpx.RemoteProtocolError; one lost in the body, httpx.ReadError while it is read.

Two ways in: `send()` (the relays: no URL parsing, no httpx objects, an `Answer`) and httpx's
transport interface (`httpx.AsyncClient(transport=ModelTransport())`, the idle watcher's
/metrics reads). `ClientLink` gives `send()` over any httpx client (the unit tests' mock
servers).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import httpx

#: The most bytes of an answer's head (status line and headers) taken.
MAX_HEAD = 64 * 1024
#: The most bytes read at once from a body with a length or read to its end.
READ_SIZE = 64 * 1024

#: Request headers this transport writes itself.
_OURS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
T = TypeVar("T")


async def _within(step: Awaitable[T], seconds: float | None) -> T:
    """`step`, at most `seconds` (None: as long as it takes); TimeoutError after."""
    return await (step if seconds is None else asyncio.wait_for(step, seconds))


@dataclass
class Answer:
    """A model's answer: its status, its headers (names in lower case) and its body, read as it
    comes; `close()` once done with it (its connection is kept when the body was read to its
    end, else dropped: a model still generating for a client that went away stops then)."""

    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterable[bytes]
    close: Callable[[], Awaitable[None]]

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)


class ClientLink:
    """`send()` over an httpx client (what the unit tests' mock servers answer through)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def send(
        self, method: str, base: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> Answer:
        request = self.client.build_request(method, base + path, headers=headers, content=body)
        answer = await self.client.send(request, stream=True)
        pairs = [(k.lower(), v) for k, v in answer.headers.items()]
        return Answer(answer.status_code, pairs, answer.stream, answer.aclose)  # type: ignore[arg-type]


class ModelTransport(httpx.AsyncBaseTransport):
    """An httpx transport for plain HTTP/1.1 to the model servers (see the module's doc)."""

    def __init__(
        self, idle_s: float = 2.0, keep: int = 64, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.idle_s = idle_s
        self.keep = keep
        self.clock = clock
        self._idle: dict[tuple[str, int], deque[tuple[float, Conn]]] = {}
        self._keys: dict[str, tuple[str, int]] = {}

    def _take(self, key: tuple[str, int]) -> Conn | None:
        """The most recently kept connection to `key` still good to use, or None."""
        kept = self._idle.get(key)
        now = self.clock()
        while kept:
            since, (reader, writer) = kept.pop()
            if now - since < self.idle_s and not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    def _keep(self, key: tuple[str, int], conn: Conn) -> None:
        kept = self._idle.setdefault(key, deque())
        now = self.clock()
        while kept and (len(kept) >= self.keep or now - kept[0][0] >= self.idle_s):
            kept.popleft()[1][1].close()
        kept.append((now, conn))

    async def send(
        self, method: str, base: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> Answer:
        """`method` `path` with `headers` and `body` to the server at `base` (http://HOST:PORT),
        with no time limit: the answer as it comes."""
        key = self._keys.get(base)
        if key is None:
            parts = urlsplit(base)
            key = self._keys[base] = (parts.hostname or "127.0.0.1", parts.port or 80)
        head = [f"{method} {path} HTTP/1.1", f"Host: {key[0]}:{key[1]}"]
        head += [f"{name}: {value}" for name, value in headers if name.lower() not in _OURS]
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        status, raw, conn = await self._exchange(key, "\r\n".join(head).encode("latin-1") + body)
        stream = _Body(self, key, conn, raw, method, status, None)
        pairs = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]
        return Answer(status, pairs, stream, stream.aclose)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        key = (url.host, url.port or 80)
        timeout = request.extensions.get("timeout", {})
        try:
            status, headers, conn = await self._exchange(
                key, _head(request) + request.content, timeout
            )
        except httpx.RequestError as exc:
            exc.request = request
            raise
        stream = _Body(
            self, key, conn, headers, request.method, status, timeout.get("read"), request
        )
        return httpx.Response(status, headers=headers, stream=stream, request=request)

    async def _exchange(
        self, key: tuple[str, int], message: bytes, timeout: dict[str, float | None] | None = None
    ) -> tuple[int, list[tuple[bytes, bytes]], Conn]:
        """`message` sent to `key`, on a kept connection or a new one: the answer's head."""
        timeout = timeout or {}
        for kept in (True, False):
            conn = self._take(key) if kept else None
            if kept and conn is None:
                continue
            if conn is None:
                try:
                    conn = await _within(asyncio.open_connection(*key), timeout.get("connect"))
                except (OSError, TimeoutError) as exc:
                    raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
            reader, writer = conn
            try:
                writer.write(message)
                await _within(writer.drain(), timeout.get("write"))
                status, headers = await _within(_answer_head(reader), timeout.get("read"))
            except TimeoutError as exc:
                writer.close()
                raise httpx.ReadTimeout("no answer in time") from exc
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError) as exc:  # fmt: skip
                writer.close()
                if kept:  # closed by the server while it waited: nothing was answered
                    continue
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response."
                ) from exc
            return status, headers, conn
        raise AssertionError("unreachable: the fresh connection either answered or raised")

    async def aclose(self) -> None:
        for kept in self._idle.values():
            while kept:
                kept.pop()[1][1].close()


def _head(request: httpx.Request) -> bytes:
    target = request.url.raw_path.decode("ascii")
    lines = [f"{request.method} {target} HTTP/1.1".encode()]
    names = set()
    for name, value in request.headers.raw:
        lowered = name.lower()
        if lowered in (b"connection", b"transfer-encoding", b"content-length", b"keep-alive"):
            continue
        names.add(lowered)
        lines.append(name + b": " + value)
    if b"host" not in names:
        port = request.url.port
        lines.append(b"Host: " + request.url.host.encode() + (f":{port}".encode() if port else b""))
    lines.append(b"Content-Length: " + str(len(request.content)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _answer_head(reader: asyncio.StreamReader) -> tuple[int, list[tuple[bytes, bytes]]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    if len(raw) > MAX_HEAD:
        raise ValueError("the answer's head is too long")
    status_line, *lines = raw[:-4].split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    if not version.startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1 answer: {status_line[:60]!r}")
    headers = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"a malformed header line: {line[:60]!r}")
        headers.append((name.strip(), value.strip()))
    return int(rest[:3]), headers


def whole_chunks(buffer: bytes) -> tuple[bytes, bytes, bool]:
    """(the data of the whole chunks at the head of `buffer`, what is left of it, whether the
    last chunk and its trailer were among them); ValueError for a malformed chunk size."""
    pieces, pos = [], 0
    while (eol := buffer.find(b"\r\n", pos)) >= 0:
        size = int(buffer[pos:eol].split(b";", 1)[0], 16)
        if size < 0:
            raise ValueError(f"a negative chunk size: {buffer[pos:eol][:20]!r}")
        if size == 0:  # the last chunk: then the trailer, to its blank line
            end = buffer.find(b"\r\n\r\n", eol)
            if end < 0:
                break
            return b"".join(pieces), b"", True
        start = eol + 2
        if len(buffer) < start + size + 2:
            break
        pieces.append(buffer[start : start + size])
        pos = start + size + 2
    return b"".join(pieces), buffer[pos:], False


class _Body(httpx.AsyncByteStream):
    """An answer's body as it arrives (chunked, with a length, or to the connection's end); the
    connection is kept for the next request once the body was read to its end."""

    def __init__(
        self,
        transport: ModelTransport,
        key: tuple[str, int],
        conn: Conn,
        headers: list[tuple[bytes, bytes]],
        method: str,
        status: int,
        read_s: float | None,
        request: httpx.Request | None = None,
    ) -> None:
        self.transport, self.key, self.conn, self.request = transport, key, conn, request
        self.read_s = read_s
        fields = {name.lower(): value.lower() for name, value in headers}
        self.chunked = b"chunked" in fields.get(b"transfer-encoding", b"")
        length = fields.get(b"content-length")
        self.length = int(length) if length and length.isdigit() and not self.chunked else None
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:  # no body, ever
            self.chunked, self.length = False, 0
        # Kept when the server did not close it and the body's end is known.
        self.reusable = b"close" not in fields.get(b"connection", b"") and (
            self.chunked or self.length is not None
        )
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reader, read_s = self.conn[0], self.read_s

        def within(step: Awaitable[T]) -> Awaitable[T]:  # the relay has no read timeout
            return step if read_s is None else asyncio.wait_for(step, read_s)

        try:
            if self.chunked:
                # Every whole chunk that has arrived goes on at once: under load (tokens come
                # faster than one relay per token) several make one piece, so a relay costs
                # less per token the busier the host is; alone, each goes on as it comes.
                buffer, done = b"", False
                while not done:
                    data = await within(reader.read(READ_SIZE))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", None)
                    pieces, buffer, done = whole_chunks(buffer + data)
                    if pieces:
                        yield pieces
            elif self.length is not None:
                left = self.length
                while left:
                    data = await within(reader.read(min(left, READ_SIZE)))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(data)
                    yield data
            else:
                while data := await within(reader.read(READ_SIZE)):
                    yield data
        except TimeoutError as exc:
            raise httpx.ReadTimeout("the answer stalled", request=self.request) from exc
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:  # fmt: skip
            raise httpx.ReadError(f"the answer broke off: {exc}", request=self.request) from exc
        self.done = True

    async def aclose(self) -> None:
        conn, self.conn = self.conn, None  # type: ignore[assignment]
        if conn is None:
            return
        if self.done and self.reusable:
            self.transport._keep(self.key, conn)
        else:
            with contextlib.suppress(Exception):
                conn[1].close()
