"""A model's answer passed on to the client as it comes: the one relay of the control service
(the routed /v1 requests, a companion's, and the wake listener's all answer through it)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx  # Debian: python3-httpx (the control role installs it)
from fastapi.responses import Response

from llamavm.host.upstream import Answer

#: The headers of a routed answer passed on: what it is, and whether it may be kept.
KEPT_HEADERS = ("content-type", "cache-control")
#: Headers a proxy does not pass on (RFC 9110 7.6.1), and those httpx sets itself.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip


def passed(answer: Answer, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """The answer's headers of `names`."""
    return [(k, v) for k, v in answer.headers if k in names]


def said(exc: BaseException) -> str:
    """An exception's message, or its kind when it has none (httpx's often have none)."""
    return str(exc) or type(exc).__name__


class Relay(Response):
    """A model's answer passed on as it comes (an ASGI response: a body message for each piece
    that arrives, no task of its own but a watch for the client going away). When the client
    goes away, the model's connection is dropped, so llama-server stops generating for nobody.
    A model that breaks off mid-answer leaves the client's answer unfinished (its connection
    closed), never ended as if whole. `after()` is awaited once the relay ends, however."""

    def __init__(self, answer: Answer, headers: list[tuple[str, str]], after: Any = None) -> None:
        self.answer, self.after = answer, after
        self.status_code, self.background = answer.status, None
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        answer = self.answer

        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            await answer.close()  # the read under way ends at once

        gone = asyncio.ensure_future(client_gone())
        try:
            await send({"type": "http.response.start", "status": answer.status,
                        "headers": self.raw_headers})  # fmt: skip
            async for piece in answer.body:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:
            if not gone.done():  # the model broke off: the client's answer stays unfinished
                print(f"llamavm-control: an answer broke off: {said(exc)}", flush=True)
        finally:
            gone.cancel()
            await answer.close()
            if self.after is not None:
                await self.after()
