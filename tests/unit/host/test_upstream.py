"""The control service's transport to the models (llamavm/host/upstream.py) against a real
server on 127.0.0.1 that answers as llama-server does: streams chunked, plain answers with a
length, connections kept alive, or closed as llama-server closes them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from llamavm.host import control
from llamavm.host.upstream import ModelTransport, whole_chunks

CHUNKS = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]


class Server:
    """A model server: POST /stream answers chunked SSE, POST /plain a JSON body with a length.
    `close_after`: it closes the connection after that many answers on it (without saying so,
    as llama-server did after every stream); `drop_next`: it reads the next request and closes
    without an answer (a kept connection it closed just as the request came)."""

    def __init__(self, close_after: int | None = None) -> None:
        self.close_after = close_after
        self.pause = 0.0
        self.drop_next = 0
        self.connections = 0
        self.requests: list[dict[str, Any]] = []
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                lines = head.decode().split("\r\n")
                path = lines[0].split(" ")[1]
                fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                body = await reader.readexactly(int(fields.get("Content-Length", 0)))
                self.requests.append({"path": path, "headers": fields, "body": body})
                if self.drop_next:
                    self.drop_next -= 1
                    return
                if path == "/stream":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
                    for chunk in CHUNKS:
                        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        await writer.drain()
                        await asyncio.sleep(self.pause)
                    writer.write(b"0\r\n\r\n")
                else:
                    answer = json.dumps({"path": path, "got": body.decode()}).encode()
                    length = b"Content-Length: %d\r\n\r\n" % len(answer)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 + length + answer)  # fmt: skip
                await writer.drain()
                answered += 1
                if self.close_after is not None and answered >= self.close_after:
                    return
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


def run(test: Any) -> Any:
    return asyncio.run(test())


async def _body(client: httpx.AsyncClient, url: str, content: bytes = b"{}") -> bytes:
    answer = await client.send(client.build_request("POST", url, content=content), stream=True)
    try:
        return b"".join([chunk async for chunk in answer.aiter_raw()])
    finally:
        await answer.aclose()


def test_a_stream_passes_chunk_by_chunk_and_its_connection_is_kept() -> None:
    async def test() -> None:
        server = Server()
        port = await server.start()
        async with httpx.AsyncClient(transport=ModelTransport()) as client:
            request = client.build_request("POST", f"http://127.0.0.1:{port}/stream", content=b"x")
            answer = await client.send(request, stream=True)
            assert answer.status_code == 200
            assert answer.headers["content-type"] == "text/event-stream"
            pieces = [chunk async for chunk in answer.aiter_raw()]
            await answer.aclose()
            assert b"".join(pieces) == b"".join(CHUNKS)
            assert all(p.endswith(b"\n\n") for p in pieces)  # whole events, never half of one
            got = json.loads(await _body(client, f"http://127.0.0.1:{port}/plain", b"hello"))
        assert got == {"path": "/plain", "got": "hello"}
        assert server.connections == 1  # the stream's connection answered the next request
        assert server.requests[0]["headers"]["Content-Length"] == "1"
        await server.stop()

    run(test)


def test_tokens_that_come_apart_go_on_apart() -> None:
    """A stream's token is passed on when it comes, not when the next one does."""

    async def test() -> None:
        server = Server()
        server.pause = 0.3
        port = await server.start()
        async with httpx.AsyncClient(transport=ModelTransport()) as client:
            request = client.build_request("POST", f"http://127.0.0.1:{port}/stream", content=b"")
            answer = await client.send(request, stream=True)
            began = asyncio.get_running_loop().time()
            seen = []
            async for piece in answer.aiter_raw():
                seen.append((piece, asyncio.get_running_loop().time() - began))
            await answer.aclose()
        assert [piece for piece, _ in seen] == CHUNKS
        assert seen[0][1] < 0.2 and seen[1][1] >= 0.25
        await server.stop()

    run(test)


@pytest.mark.parametrize(
    ("buffer", "pieces", "left", "done"),
    [
        (b"5\r\nhello\r\n", b"hello", b"", False),
        (b"5\r\nhello\r\n3\r\nabc\r\n", b"helloabc", b"", False),
        (b"5\r\nhel", b"", b"5\r\nhel", False),
        (b"5\r\nhello\r", b"", b"5\r\nhello\r", False),
        (b"5\r\nhello\r\n1", b"hello", b"1", False),
        (b"5;ext=1\r\nhello\r\n0\r\n\r\n", b"hello", b"", True),
        (b"5\r\nhello\r\n0\r\n", b"hello", b"0\r\n", False),
        (b"0\r\nX-Trailer: 1\r\n\r\n", b"", b"", True),
        (b"1A\r\n" + b"x" * 26 + b"\r\n", b"x" * 26, b"", False),
    ],
)  # fmt: skip
def test_whole_chunks_are_taken_from_what_arrived(buffer, pieces, left, done) -> None:
    assert whole_chunks(buffer) == (pieces, left, done)


@pytest.mark.parametrize("buffer", [b"zz\r\nhello\r\n", b"-5\r\nhello\r\n", b"\r\n"])
def test_a_malformed_chunk_size_is_an_error(buffer) -> None:
    with pytest.raises(ValueError):
        whole_chunks(buffer)


def test_a_connection_the_server_closed_after_a_stream_is_not_reused() -> None:
    """llama-server without llamavm's source patch closes after every stream, unannounced."""

    async def test() -> None:
        server = Server(close_after=1)
        port = await server.start()
        async with httpx.AsyncClient(transport=ModelTransport()) as client:
            for _ in range(5):
                assert await _body(client, f"http://127.0.0.1:{port}/stream") == b"".join(CHUNKS)
        assert server.connections == 5 and len(server.requests) == 5
        await server.stop()

    run(test)


def test_a_kept_connection_closed_as_the_request_came_is_sent_again_on_a_new_one() -> None:
    async def test() -> None:
        server = Server()
        port = await server.start()
        async with httpx.AsyncClient(transport=ModelTransport()) as client:
            await _body(client, f"http://127.0.0.1:{port}/plain")
            server.drop_next = 1  # the kept connection: read, then closed without an answer
            got = json.loads(await _body(client, f"http://127.0.0.1:{port}/plain", b"again"))
            assert got["got"] == "again"
            assert [r["body"] for r in server.requests] == [b"{}", b"again", b"again"]
            server.drop_next = 1  # a new connection that answers nothing: an error, not a loop
            await asyncio.sleep(2.1)  # nothing kept any more (idle_s 2.0)
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                await _body(client, f"http://127.0.0.1:{port}/plain")
        await server.stop()

    run(test)


def test_idle_connections_go_before_llama_server_drops_them() -> None:
    """cpp-httplib closes a connection idle for 5 s; the transport lets its own go sooner."""
    now = [0.0]

    async def test() -> None:
        server = Server()
        port = await server.start()
        transport = ModelTransport(idle_s=control.UPSTREAM_IDLE_S, clock=lambda: now[0])
        async with httpx.AsyncClient(transport=transport) as client:
            await _body(client, f"http://127.0.0.1:{port}/plain")
            now[0] += control.UPSTREAM_IDLE_S - 0.5
            await _body(client, f"http://127.0.0.1:{port}/plain")
            assert server.connections == 1
            now[0] += control.UPSTREAM_IDLE_S
            await _body(client, f"http://127.0.0.1:{port}/plain")
            assert server.connections == 2
        await server.stop()

    assert control.UPSTREAM_IDLE_S < 5
    run(test)


def test_at_most_keep_connections_are_kept() -> None:
    async def test() -> None:
        server = Server()
        port = await server.start()
        transport = ModelTransport(keep=2)
        async with httpx.AsyncClient(transport=transport) as client:
            url = f"http://127.0.0.1:{port}/plain"
            await asyncio.gather(*(_body(client, url) for _ in range(5)))
            assert server.connections == 5
            await asyncio.gather(*(_body(client, url) for _ in range(5)))
            assert server.connections == 8  # 2 of the first five kept, 3 new
        await server.stop()

    run(test)


def test_a_refused_port_is_a_connect_error() -> None:
    async def test() -> None:
        server = Server()
        port = await server.start()
        await server.stop()
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(transport=ModelTransport()) as client:
            with pytest.raises(httpx.ConnectError):
                await _body(client, f"http://127.0.0.1:{port}/plain")

    run(test)


def test_a_body_that_breaks_off_is_a_read_error_and_its_connection_is_dropped() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.close()

    async def test() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = ModelTransport()
        async with httpx.AsyncClient(transport=transport) as client:
            request = client.build_request("POST", f"http://127.0.0.1:{port}/stream", content=b"")
            answer = await client.send(request, stream=True)
            seen: list[bytes] = []
            with pytest.raises(httpx.ReadError, match="broke off"):
                async for chunk in answer.aiter_raw():
                    seen.append(chunk)
            await answer.aclose()
            assert seen == [b"hello"]
            assert not any(transport._idle.values())
        server.close()

    run(test)


def test_a_stalled_answer_honours_the_read_timeout() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(5)

    async def test() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with httpx.AsyncClient(transport=ModelTransport()) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get(f"http://127.0.0.1:{port}/metrics", timeout=0.2)
        server.close()

    run(test)


def test_send_answers_as_the_relays_want_it() -> None:
    """The relays' way in: no httpx objects, the answer's headers in lower case, its body as it
    comes, the connection kept once the body was read to its end."""

    async def test() -> None:
        server = Server()
        port = await server.start()
        transport = ModelTransport()
        base = f"http://127.0.0.1:{port}"
        headers = [("Content-Type", "application/json"), ("Connection", "close")]
        answer = await transport.send("POST", base, "/stream", headers, b'{"a": 1}')
        assert answer.status == 200 and answer.header("content-type") == "text/event-stream"
        assert b"".join([piece async for piece in answer.body]) == b"".join(CHUNKS)
        await answer.close()
        answer = await transport.send("POST", base, "/plain?x=1", [], b"hi")
        assert json.loads(b"".join([piece async for piece in answer.body])) == {
            "path": "/plain?x=1",
            "got": "hi",
        }
        await answer.close()
        assert server.connections == 1  # kept, although the caller asked for close: ours
        sent = server.requests[0]["headers"]
        assert sent["Host"] == f"127.0.0.1:{port}" and sent["Content-Length"] == "8"
        assert "Connection" not in sent
        await transport.aclose()
        await server.stop()

    run(test)


def test_a_relay_that_stops_reading_drops_the_connection() -> None:
    """A client gone mid-stream: its answer is closed unread, the model's connection dropped
    (llama-server stops generating for nobody) and never handed to another request."""

    async def test() -> None:
        server = Server()
        server.pause = 0.2
        port = await server.start()
        transport = ModelTransport()
        answer = await transport.send("POST", f"http://127.0.0.1:{port}", "/stream", [], b"")
        async for _ in answer.body:
            break
        await answer.close()
        assert not any(transport._idle.values())
        await asyncio.sleep(0.1)
        assert server.connections == 1
        await server.stop()

    run(test)


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_an_answer_without_a_body_ends_at_its_head(method, status) -> None:
    """No body after a HEAD, a 204 or a 304 (whatever the headers say): reading it must not
    wait for a connection the server keeps open."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 %d X\r\nContent-Type: text/plain\r\n\r\n" % status)
            await writer.drain()

    async def test() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = ModelTransport()
        for _ in range(2):  # and the connection serves the next request
            answer = await asyncio.wait_for(
                transport.send(method, f"http://127.0.0.1:{port}", "/", [], b""), 5
            )
            assert answer.status == status
            assert await asyncio.wait_for(_read(answer), 5) == b""
            await answer.close()
        assert len(transport._idle[("127.0.0.1", port)]) == 1
        await transport.aclose()
        server.close()

    run(test)


async def _read(answer) -> bytes:
    return b"".join([piece async for piece in answer.body])
