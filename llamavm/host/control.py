"""The control service: a REST API, the model picker page and OpenAI-compatible routing.

`llamavm-switch control` runs it (llamavm-control.service, an unprivileged user, FastAPI on
uvicorn from Debian). It changes nothing itself: every request that reads or changes what the
host serves goes to the privileged helper (llamavm/host/helper.py) over a unix socket only
this service's group may open, and the helper runs the same transaction `invoke switch` runs.

    GET  /health                 public: {"status": "ok"}
    GET  /                       public: the model picker page (it asks for the key)
    GET  /docs, /openapi.json    public: the API's documentation
    GET  /models                 the catalog: VRAM verdicts, reasoning presets, which serves
    GET  /status                 what `invoke status` shows
    GET  /transactions/ID        how a transaction ended (202 while it runs)
    POST /switch {"model": M}    switch (JSON outcome; server-sent events with ?stream=true or
    POST /stop, POST /restart      Accept: text/event-stream: progress events, then the outcome;
                                   ?tx=ID names the transaction, see GET /transactions/ID)
    GET  /v1/models              routing on: every catalog model (and model:preset)
    POST /v1/chat/completions    routing on: served by the model the request names; a request
    POST /v1/completions           naming another catalog model switches to it first (queued
    POST /v1/embeddings            behind the requests in flight); `model:effort` picks a preset

With settings.api_key.policy required, every other endpoint wants the key as
`Authorization: Bearer KEY` or `X-Api-Key: KEY` (401 otherwise; auth.py). The /v1 routing is
routing.py's, idle unload and the wake listener idle.py's, the relay of a model's answer
relay.py's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx  # Debian: python3-httpx (the control role installs it)
from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from llamavm.host import EXIT_UNKNOWN, TX_PATTERN, picker
from llamavm.host import contract as contract_mod
from llamavm.host.auth import KEY_WANTED, key_given, read_key
from llamavm.host.contract import Contract, HostError, LiveContract
from llamavm.host.idle import IDLE_TICK_S, wake_app, watch_idle
from llamavm.host.protocol import MAX_REQUEST, request_line
from llamavm.host.routing import ROUTED, RoutedFirst, Router, Routes
from llamavm.host.upstream import ClientLink, ModelTransport

#: How the helper's outcome codes read over HTTP.
HTTP_STATUS = {0: 200, 1: 500, 2: 409, 3: 409, 4: 500, 5: 500, 6: 202}
#: llama-server closes a kept-alive connection after 5 s without a request (cpp-httplib's
#: keep-alive timeout): this service lets its idle connections to the models go well before,
#: so it never sends a request on a connection the server is closing.
UPSTREAM_IDLE_S = 2.0
#: Connections to the models kept for reuse (as many as requests the front door lets through
#: at once, rounded up).
UPSTREAM_KEEP = 64
#: How long this service keeps a client's idle connection open. uvicorn's 5 s would race with
#: the clients that keep theirs 5 s (httpx, and so the OpenAI clients): a request sent as the
#: server closes fails without an answer.
CLIENT_KEEPALIVE_S = 75
#: ?tx=ID: the caller's own transaction id, so that it can ask how the transaction ended when
#: its connection breaks (the controller's `invoke switch` does).
TX_QUERY = Query(None, max_length=64, description="this transaction's id (a-z, 0-9; 6-32)")
TX_RE = re.compile(TX_PATTERN)


def _tx(tx: str | None) -> dict[str, str]:
    """`tx` checked (by hand: Debian's FastAPI predates Query(pattern=))."""
    if tx is None:
        return {}
    if not TX_RE.fullmatch(tx):
        raise HTTPException(422, f"tx: {tx[:64]!r} is not a transaction id (a-z, 0-9; 6-32)")
    return {"tx": tx}


class Helper:
    """The privileged helper, one connection per request (llamavm-switchd.socket)."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    async def events(self, op: str, **fields: str) -> AsyncIterator[dict[str, Any]]:
        """The helper's events for one request: progress lines, then its outcome."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket), limit=1 << 22)
        except OSError as exc:
            yield {"event": "outcome", **_unreachable(self.socket, exc)}
            return
        try:
            line = request_line(op, **fields)
            if len(line) > MAX_REQUEST:
                raise HostError("the request is too long", 2)
            writer.write(line)
            await writer.drain()
            while raw := await reader.readline():
                event = json.loads(raw)
                last = event.get("event") == "outcome"
                yield event
                if last:
                    return
            yield {"event": "outcome", **_unreachable(self.socket, EOFError("no outcome"))}
        except (OSError, ValueError, HostError) as exc:
            yield {"event": "outcome", **_unreachable(self.socket, exc)}
        finally:
            writer.close()

    async def call(self, op: str, **fields: str) -> dict[str, Any]:
        outcome: dict[str, Any] = {}
        async for event in self.events(op, **fields):
            if event.get("event") == "outcome":
                outcome = event
        outcome.pop("event", None)
        return outcome


def _unreachable(socket: Path, exc: BaseException) -> dict[str, Any]:
    return {
        "ok": False,
        "code": EXIT_UNKNOWN,
        "error": f"the privileged helper on {socket} did not answer ({exc}) — check "
        "'systemctl status llamavm-switchd.socket'",
    }


def catalog_view(contract: Contract, status: dict[str, Any]) -> list[dict[str, Any]]:
    """GET /models: each model with its VRAM verdict, presets, and what serves."""
    by_name = {m["name"]: m for m in status.get("models", [])}
    asleep = (status.get("asleep") or {}).get("model")
    out = []
    for model in contract.models:
        live = by_name.get(model.name, {})
        out.append(
            {
                "name": model.name,
                "aliases": list(model.aliases),
                "description": model.description,
                "port": model.port,
                "active": status.get("active") == model.name,
                "asleep": asleep == model.name,
                "idle_unload_s": model.idle_unload_s,
                "state": live.get("state"),
                "vram": model.vram,
                "reasoning": model.reasoning,
                "load": model.load,
                "last_cold": live.get("last_cold"),
                "last_warm": live.get("last_warm"),
                "loads": live.get("loads", []),
            }
        )
    return out


def create_app(
    contract: Contract,
    helper: Helper,
    key: str | None,
    upstream: Any = None,
    contract_path: Path | None = None,
    idle_tick_s: float | None = None,
) -> Any:
    """The FastAPI application. `upstream`: what reaches the models (an httpx.AsyncClient, or
    by default llamavm's lean transport, which the relays use directly);
    `contract_path`: the file to follow for models added or changed since the start;
    `idle_tick_s`: run the idle watcher, a look this often (None: not). `app.state.wake` is
    the wake listener's application, `app.state.router` the router both share."""
    live = LiveContract(contract, contract_path)
    control = contract.control
    routing = bool(control and control.routing)
    app = FastAPI(
        title="llamavm control",
        description="Switch, stop and restart the model this host serves; see what runs; "
        "route OpenAI requests to the model they name. Every endpoint but /health, the "
        "picker page and these docs wants the API key (Authorization: Bearer KEY).",
        version="1",
    )
    if upstream is None:
        transport = ModelTransport(idle_s=UPSTREAM_IDLE_S, keep=UPSTREAM_KEEP)
        client, link = httpx.AsyncClient(transport=transport), transport
    else:
        client, link = upstream, ClientLink(upstream)
    router = Router(live, helper, state_stamp(contract.paths.state))
    routes = Routes(live, router, link, key, routing)
    app.state.router = router
    app.state.wake = wake_app(router, live, link, key, control.wake_wait_s if control else 120)
    watcher: list[asyncio.Task[None]] = []

    async def authorized(request: Request) -> None:  # async: no worker thread per request
        if key is not None and not key_given(request, key):
            raise HTTPException(401, KEY_WANTED, headers={"WWW-Authenticate": "Bearer"})

    def outcome_response(outcome: dict[str, Any]) -> JSONResponse:
        code = int(outcome.get("code", 0))
        status = HTTP_STATUS.get(code, 500)
        if code == 2 and str(outcome.get("error", "")).startswith("no model named"):
            status = 404
        return JSONResponse(outcome, status_code=status)

    def wants_stream(request: Request, stream: bool) -> bool:
        return stream or "text/event-stream" in request.headers.get("accept", "")

    async def sse(op: str, **fields: str) -> AsyncIterator[bytes]:
        async for event in helper.events(op, **fields):
            kind = event.pop("event", "progress")
            if kind == "outcome":
                await router.observe(op, event)
            yield f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode()

    async def transaction(request: Request, op: str, stream: bool, **fields: str) -> Any:
        if wants_stream(request, stream):
            return StreamingResponse(
                sse(op, **fields),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )
        return outcome_response(await router.ask(op, **fields))

    @app.get("/health", tags=["public"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, tags=["public"], include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(picker.PAGE, headers={"Cache-Control": "no-store"})

    @app.get("/models", dependencies=[Depends(authorized)])
    async def models() -> Any:
        status = await router.ask("status")
        if not status.get("ok"):
            return outcome_response(status)
        return {"active": status.get("active"), "models": catalog_view(live.now, status)}

    @app.get("/status", dependencies=[Depends(authorized)])
    async def status() -> Any:
        answer = await router.ask("status")
        return answer if answer.get("ok") else outcome_response(answer)

    @app.post("/switch", dependencies=[Depends(authorized)])
    async def switch(
        request: Request,
        model: str = Body(..., embed=True, max_length=256),
        stream: bool = False,
        tx: str | None = TX_QUERY,
    ) -> Any:
        try:
            name = live.now.resolve(model).name
        except HostError as exc:
            raise HTTPException(404, str(exc)) from None
        return await transaction(request, "switch", stream, model=name, **_tx(tx))

    @app.get("/transactions/{tx}", dependencies=[Depends(authorized)])
    async def transaction_result(tx: str = PathParam(..., max_length=64)) -> Any:
        """How transaction `tx` ended (202 with code 6 while it still runs)."""
        return outcome_response(await helper.call("result", **_tx(tx)))

    @app.post("/stop", dependencies=[Depends(authorized)])
    async def stop(request: Request, stream: bool = False, tx: str | None = TX_QUERY) -> Any:
        return await transaction(request, "stop", stream, **_tx(tx))

    @app.post("/restart", dependencies=[Depends(authorized)])
    async def restart(request: Request, stream: bool = False, tx: str | None = TX_QUERY) -> Any:
        return await transaction(request, "restart", stream, **_tx(tx))

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def v1_models() -> Any:
        return await routes.models()

    for path in ROUTED:

        async def endpoint(request: Request, _path: str = path) -> Any:
            return await routes.route(request, _path)

        app.add_api_route(
            f"/v1/{path}",
            endpoint,
            methods=["POST"],
            dependencies=[Depends(authorized)],
            name=f"v1_{path.replace('/', '_')}",
        )

    app.add_middleware(RoutedFirst, paths={f"/v1/{path}" for path in ROUTED}, handle=routes.handle)

    @app.on_event("startup")
    async def start() -> None:
        if idle_tick_s:
            watcher.append(asyncio.create_task(watch_idle(router, live, client, key, idle_tick_s)))

    @app.on_event("shutdown")
    async def close() -> None:
        for task in watcher:
            task.cancel()
        await client.aclose()

    return app


def dispatch(main: Any, wake: Any, wake_port: int, close_wake: bool = False) -> Any:
    """One ASGI application for both listeners: a request that came in on `wake_port` goes to
    the wake listener's application, everything else (and the lifespan) to the main one.
    `close_wake` (a host, where the front door's map leads here only while no model is
    exposed): each wake-listener answer closes its connection, so the front door's next request
    dials again and, once a model is exposed, reaches it directly."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        server = scope.get("server") or (None, None)
        if scope["type"] != "http" or not wake_port or server[1] != wake_port:
            await main(scope, receive, send)
            return

        async def send_closing(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kept = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                message = {**message, "headers": [*kept, (b"connection", b"close")]}
            await send(message)

        await wake(scope, receive, send_closing if close_wake else send)

    return app


def listener(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((address, port))
    sock.set_inheritable(True)
    return sock


def state_stamp(path: Path) -> Any:
    """The stamp of the helper's state file (None while it cannot be read): it changes with
    every switch, stop or sleep, whoever ran it (routing.Router.notice)."""

    def stamp() -> object:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    return stamp


def quiet_routes(record: logging.LogRecord) -> bool:
    """The access log without the routed /v1 requests (a line each, dozens a second under
    load, to the journal): what the API was asked to do stays in it."""
    args = record.args if isinstance(record.args, tuple) else ()
    return not (len(args) >= 3 and str(args[2]).startswith("/v1/"))


def main(contract: Contract, path: Path = contract_mod.CONTRACT_PATH) -> int:
    """Run the control service (llamavm-control.service)."""
    import uvicorn  # Debian: python3-uvicorn

    if contract.control is None:
        raise HostError("the control service is off in the catalog (settings.control)", 2)
    control = contract.control
    app = create_app(
        contract,
        Helper(control.helper_socket),
        read_key(contract),
        contract_path=path,
        idle_tick_s=IDLE_TICK_S,
    )
    # On a host, the front door reaches the wake listener through the firewall's map.
    mapped = contract.firewall is not None and bool(contract.firewall.front_door_map)
    sockets = [listener(control.bind_address, control.port)]
    if control.wake_port:
        sockets.append(listener(control.wake_bind, control.wake_port))
    config = uvicorn.Config(
        dispatch(app, app.state.wake, control.wake_port, close_wake=mapped),
        log_level="info",
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=CLIENT_KEEPALIVE_S,
    )
    logging.getLogger("uvicorn.access").addFilter(quiet_routes)
    uvicorn.Server(config).run(sockets=sockets)
    return 0
