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
`Authorization: Bearer KEY` or `X-Api-Key: KEY` (401 otherwise).

Idle unload: a model with `idle_unload_s` in the catalog is put to sleep (the helper's `sleep`
transaction: stopped, GPU memory freed, still the chosen model) once its server has seen no
request for that long — its /metrics counters unchanged, nothing in flight there or here. While
it sleeps the firewall sends the front door to this service's wake listener (127.0.0.1 on the
contract's control.wake_port): any request there wakes the model, waits for it (at most
control.wake_wait_s, then a retryable 503) and is passed on; a routed /v1 request wakes it too.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx  # Debian: python3-httpx (the control role installs it)
from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from llamavm.host import EXIT_UNKNOWN, TX_PATTERN, picker
from llamavm.host import contract as contract_mod
from llamavm.host.activity import activity
from llamavm.host.contract import Contract, HostError, Model
from llamavm.host.protocol import MAX_REQUEST, request_line
from llamavm.host.upstream import Answer, ClientLink, ModelTransport

#: How the helper's outcome codes read over HTTP.
HTTP_STATUS = {0: 200, 1: 500, 2: 409, 3: 409, 4: 500, 5: 500, 6: 202}
#: A routed request waits at most this long for its model (behind a switch and its queue).
ROUTE_WAIT_S = 900.0
ROUTED = ("chat/completions", "completions", "embeddings", "rerank")
#: The routed paths a companion of that task answers when a request names no model.
TASK_PATHS = {"embeddings": "embeddings", "rerank": "rerank"}
#: The idle watcher looks at the serving model's counters this often, and asks the helper what
#: serves at least this often (a switch over SSH is not told to this service).
IDLE_TICK_S = 1.0
REFRESH_S = 30.0
#: llama-server closes a kept-alive connection after 5 s without a request (cpp-httplib's
#: keep-alive timeout): this service lets its idle connections to the models go well before,
#: so it never sends a request on a connection the server is closing.
UPSTREAM_IDLE_S = 2.0
#: Connections to the models kept for reuse (as many as requests the front door lets through
#: at once, rounded up).
UPSTREAM_KEEP = 64
#: A routed request nothing answered (refused: the model moved; a kept-alive connection the
#: server had closed) is sent again, at most this many times in all.
SEND_ATTEMPTS = 3
#: How long this service keeps a client's idle connection open. uvicorn's 5 s would race with
#: the clients that keep theirs 5 s (httpx, and so the OpenAI clients): a request sent as the
#: server closes fails without an answer.
CLIENT_KEEPALIVE_S = 75
#: Errors of a request to a model that got no response at all.
NOTHING_ANSWERED = (
    httpx.ConnectError,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)
#: Headers a proxy does not pass on (RFC 9110 7.6.1), and those httpx sets itself.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip
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


class LiveContract:
    """The host contract as `invoke provision` last wrote it: re-read when the file changes, so
    a model added to the catalog is known at once. What the service was started with (its
    address, port, routing and key) stays: the control role restarts it when those change. A
    rewrite that does not parse keeps the last good contract (and says so in the journal)."""

    def __init__(self, contract: Contract, path: Path | None = None) -> None:
        self._contract = contract
        self._path = path
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    @property
    def now(self) -> Contract:
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp and self._path is not None:
            self._stamp = stamp
            try:
                self._contract = contract_mod.load(self._path)
            except HostError as exc:
                print(f"llamavm-control: kept the last good contract: {exc}", flush=True)
        return self._contract


class RouteError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Router:
    """One model on the GPU at a time: requests for the serving model go straight through;
    one for another model waits for the requests in flight, then switches (one transaction),
    and every request waiting for that model goes through together. While a request waits for
    another model, new requests for the serving one queue behind it (no starvation)."""

    def __init__(self, contract: LiveContract, helper: Helper) -> None:
        self.contract = contract
        self.helper = helper
        self.cond = asyncio.Condition()
        self.serving: str | None = None
        self.known = False
        self.in_flight = 0
        self.switching = False
        self.waiting: dict[str, int] = {}
        #: After a switch: how many requests for the new model go in before a waiting
        #: request for another model may switch again.
        self.batch = 0
        #: The model put to sleep for idleness (None: none); a request for it wakes it.
        self.asleep: str | None = None
        self.refreshed = float("-inf")
        self.clock = time.monotonic

    async def _refresh(self) -> None:
        status = await self.helper.call("status")
        self._heard(status)

    def _heard(self, status: dict[str, Any]) -> None:
        ok = bool(status.get("ok"))
        self.serving = status.get("active") if ok else None
        self.asleep = (status.get("asleep") or {}).get("model") if ok else None
        self.known = ok
        self.refreshed = self.clock()

    async def refresh(self) -> None:
        """Ask the helper what serves (unless a switch of this router's is under way)."""
        async with self.cond:
            if self.switching:
                return
        status = await self.helper.call("status")
        async with self.cond:
            if not self.switching:
                self._heard(status)
                self.cond.notify_all()

    @property
    def busy(self) -> bool:
        """Requests in flight through this service, or waiting for a model."""
        return bool(self.in_flight or self.switching or any(self.waiting.values()))

    async def sleep(self, name: str) -> dict[str, Any] | None:
        """Put `name` to sleep (the helper's sleep transaction) if it still serves and nothing
        goes through this service; None when that no longer holds. Routed requests that come
        meanwhile wait, then wake it."""
        async with self.cond:
            if self.busy or self.serving != name:
                return None
            self.switching = True
        outcome: dict[str, Any] = {}
        try:
            outcome = await self.helper.call("sleep", model=name)
        finally:
            async with self.cond:
                self.switching = False
                self.batch = 0
                if outcome.get("ok"):
                    self.serving, self.asleep, self.known = None, name, True
                else:
                    self.known = False
                self.cond.notify_all()
        return outcome

    async def acquire(self, name: str) -> Model:
        """Wait until `name` serves, switching to it when its turn comes."""
        while True:
            async with self.cond:
                self.waiting[name] = self.waiting.get(name, 0) + 1
                try:
                    while True:
                        if not self.known and not self.switching:
                            await self._refresh()
                        if self._admit(name):
                            self.in_flight += 1
                            return self.contract.now.resolve(name)
                        if self._may_switch(name):
                            self.switching = True
                            break
                        await self.cond.wait()
                finally:
                    self.waiting[name] -= 1
                    self.cond.notify_all()
            outcome: dict[str, Any] = {}
            try:
                outcome = await self.helper.call("switch", model=name)
            finally:
                async with self.cond:
                    self.switching = False
                    if outcome.get("ok"):
                        # This turn: the requests waiting for `name` now, and this one.
                        self.serving, self.known, self.asleep = name, True, None
                        self.batch = self.waiting.get(name, 0) + 1
                    else:
                        self.known, self.batch = False, 0
                    self.cond.notify_all()
            if not outcome.get("ok"):
                raise RouteError(
                    503, f"could not switch to {name}: {outcome.get('error', 'unknown error')}"
                )

    def _admit(self, name: str) -> bool:
        """`name` serves, and no other model waits (or this request is in its turn)."""
        if self.switching or self.serving != name:
            return False
        if self.batch > 0:
            self.batch -= 1
            return True
        return not any(n != name and count for n, count in self.waiting.items())

    def _may_switch(self, name: str) -> bool:
        """Nothing in flight, and the serving model's turn is over."""
        if self.switching or self.in_flight or self.serving == name:
            return False
        return self.batch == 0 or not self.waiting.get(self.serving or "", 0)

    async def observe(self, op: str, outcome: dict[str, Any]) -> None:
        """Follow what an API switch, stop or restart, or a status, said of the serving model:
        a routed request after an API switch then goes straight through."""
        async with self.cond:
            if self.switching:  # the router's own switch says what serves
                return
            if not outcome.get("ok"):
                self.known = op == "status" and self.known
            elif op == "status":
                self._heard(outcome)
            elif op == "switch" and outcome.get("model"):
                self.serving, self.known, self.asleep = outcome["model"], True, None
            elif op == "stop":
                self.serving, self.known, self.asleep = None, True, None
            if op != "status":
                self.batch = 0
            self.cond.notify_all()

    async def release(self, stale: bool = False) -> None:
        async with self.cond:
            self.in_flight -= 1
            if stale:
                self.known = False
            self.cond.notify_all()


class IdleClock:
    """How long the serving model has gone without a request: its clock starts when it is
    first seen serving and starts again at any change of its counters, any request under way
    (on the server or through this service), and any look that could not read the counters."""

    def __init__(self) -> None:
        self.model: str | None = None
        self.counters: tuple[float, ...] | None = None
        self.since = 0.0

    def observe(
        self, model: str | None, counters: tuple[float, ...] | None, busy: bool, now: float
    ) -> None:
        if model != self.model or busy or counters is None or counters != self.counters:
            self.model, self.counters, self.since = model, counters, now

    def idle_s(self, now: float) -> float:
        return now - self.since if self.model is not None else 0.0

    def due(self, limit_s: float, now: float) -> bool:
        return self.model is not None and limit_s > 0 and self.idle_s(now) >= limit_s


async def _read_activity(
    client: Any, model: Model, key: str | None
) -> tuple[tuple[float, ...], int] | bool | None:
    """The model's activity, None when its /metrics says nothing usable, False when its server
    does not answer at all (it no longer serves: ask the helper again)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        answer = await client.get(f"{model.base_url}/metrics", headers=headers, timeout=3.0)
    except httpx.ConnectError:
        return False
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        return None
    return activity(answer.text)


async def idle_step(
    router: Router, live: LiveContract, clock: IdleClock, client: Any, key: str | None,
    now: float,
) -> dict[str, Any] | None:  # fmt: skip
    """One look of the idle watcher; the sleep transaction's outcome when it put one to sleep."""
    contract = live.now
    if not any(m.idle_unload_s for m in contract.models):
        clock.observe(None, None, False, now)
        return None
    if not router.known or now - router.refreshed >= REFRESH_S:
        await router.refresh()
    model = contract.find(router.serving)
    if model is None or router.switching:
        clock.observe(None, None, False, now)
        return None
    seen = await _read_activity(client, model, key)
    if seen is False:
        router.known = False
        clock.observe(None, None, False, now)
        return None
    counters, busy = seen if seen else (None, 0)
    clock.observe(model.name, counters, bool(busy) or router.busy, now)
    if not clock.due(model.idle_unload_s, now):
        return None
    idle = clock.idle_s(now)
    outcome = await router.sleep(model.name)
    if outcome is None:
        return None
    if outcome.get("ok"):
        print(f"llamavm-control: {model.name} asleep after {idle:.0f}s idle", flush=True)
    else:
        print(f"llamavm-control: {model.name} stays: {outcome.get('error')}", flush=True)
    clock.observe(None, None, False, now)
    return outcome


async def watch_idle(
    router: Router, live: LiveContract, client: Any, key: str | None, tick_s: float
) -> None:
    """The idle watcher: a look every `tick_s`; it never dies of a failed look."""
    clock = IdleClock()
    while True:
        await asyncio.sleep(tick_s)
        try:
            await idle_step(router, live, clock, client, key, time.monotonic())
        except Exception as exc:  # a look that failed is only told, the next one comes
            print(f"llamavm-control: idle watcher: {type(exc).__name__}: {exc}", flush=True)


def key_given(request: Request, key: str) -> bool:
    """The request carries `key` (Authorization: Bearer KEY, or X-Api-Key)."""
    given = request.headers.get("x-api-key", "")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given = token.strip()
    return bool(given) and hmac.compare_digest(given.encode(), key.encode())


def resolve_route(contract: Contract, requested: Any, serving: str | None) -> tuple[Model, str]:
    """The model a /v1 request names (`name`, `alias` or `name:effort`) and its preset ('')."""
    if requested in (None, ""):
        return contract.resolve(serving or contract.default_model), ""
    if not isinstance(requested, str):
        raise RouteError(400, "model must be a string")
    name, _, preset = requested.partition(":")
    try:
        model = contract.resolve(name)
    except HostError as exc:
        raise RouteError(404, str(exc)) from None
    presets = (model.reasoning or {}).get("presets", [])
    if preset and preset not in presets:
        raise RouteError(
            400,
            f"{model.name} has no reasoning preset {preset!r}"
            + (f" — use one of: {', '.join(presets)}" if presets else ""),
        )
    return model, preset


def companion_route(contract: Contract, requested: Any, path: str) -> Model | None:
    """The companion a /v1 request goes to: the one it names, or, naming none, the companion
    whose task answers `path` (/v1/embeddings, /v1/rerank). None: a big model's request."""
    if isinstance(requested, str) and requested:
        return contract.companion(requested.partition(":")[0])
    task = next((t for t, p in TASK_PATHS.items() if p == path), None)
    return next((m for m in contract.companions if m.task == task), None) if task else None


def model_list(contract: Contract, serving: str | None) -> dict[str, Any]:
    """/v1/models: every catalog model, and each reasoning preset as model:effort."""
    data = []
    for model in contract.companions:
        data.append(
            {
                "id": model.name,
                "object": "model",
                "created": 0,
                "owned_by": "llamavm",
                "aliases": list(model.aliases),
                "companion": True,
                "task": model.task,
            }
        )
    for model in contract.models:
        reasoning = model.reasoning or {}
        data.append(
            {
                "id": model.name,
                "object": "model",
                "created": 0,
                "owned_by": "llamavm",
                "aliases": list(model.aliases),
                "active": model.name == serving,
                "reasoning_presets": reasoning.get("presets", []),
            }
        )
        for preset in reasoning.get("presets", []):
            data.append(
                {
                    "id": f"{model.name}:{preset}",
                    "object": "model",
                    "created": 0,
                    "owned_by": "llamavm",
                    "parent": model.name,
                    "active": model.name == serving,
                }
            )
    return {"object": "list", "data": data}


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


def read_key(contract: Contract) -> str | None:
    """The API key from the unit's credential (LoadCredential=api-key), or None (policy none)."""
    if contract.api_key_policy != "required":
        return None
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise HostError("the API key policy is required but no credential was passed", 2)
    key = (Path(directory) / "api-key").read_text(encoding="utf-8").strip()
    if not key:
        raise HostError("the API key credential is empty", 2)
    return key


#: What a request without the key is told (401).
KEY_WANTED = "this endpoint wants the API key: Authorization: Bearer KEY (or X-Api-Key)"


class RoutedFirst:
    """ASGI middleware: the routed requests (POST /v1/...) are answered here, ahead of
    FastAPI's routing, dependencies and exception layers, which a relay would otherwise pass
    every token through; everything else goes on to the application. (The same routes stay in
    the application, for its API documentation.)"""

    def __init__(self, app: Any, paths: set[str], handle: Any) -> None:
        self.app, self.paths, self.handle = app, paths, handle

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)


#: The headers of a routed answer passed on: what it is, and whether it may be kept.
KEPT_HEADERS = ("content-type", "cache-control")


def upstream_headers(key: str | None) -> list[tuple[str, str]]:
    """A routed request's headers to the model: JSON, the key, and identity (the answer is
    passed on as it comes, so it must not be compressed)."""
    headers = [("Content-Type", "application/json"), ("Accept-Encoding", "identity")]
    if key is not None:
        headers.append(("Authorization", f"Bearer {key}"))
    return headers


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
    router = Router(live, helper)
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

    async def call(op: str, **fields: str) -> dict[str, Any]:
        outcome = await helper.call(op, **fields)
        await router.observe(op, outcome)
        return outcome

    async def transaction(request: Request, op: str, stream: bool, **fields: str) -> Any:
        if wants_stream(request, stream):
            return StreamingResponse(
                sse(op, **fields),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )
        return outcome_response(await call(op, **fields))

    @app.get("/health", tags=["public"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, tags=["public"], include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(picker.PAGE, headers={"Cache-Control": "no-store"})

    @app.get("/models", dependencies=[Depends(authorized)])
    async def models() -> Any:
        status = await call("status")
        if not status.get("ok"):
            return outcome_response(status)
        return {"active": status.get("active"), "models": catalog_view(live.now, status)}

    @app.get("/status", dependencies=[Depends(authorized)])
    async def status() -> Any:
        answer = await call("status")
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

    def openai_error(status: int, message: str) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(
            {"error": {"message": message, "type": kind, "code": status}}, status_code=status
        )

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def v1_models() -> Any:
        if not routing:
            return openai_error(404, "routing is off: set settings.control.routing: true")
        status = await call("status")
        return model_list(live.now, status.get("active"))

    async def route(request: Request, path: str) -> Any:
        if not routing:
            return openai_error(404, "routing is off: set settings.control.routing: true")
        try:
            body = await request.json()
        except ValueError:
            return openai_error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return openai_error(400, "the request body must be a JSON object")
        companion = companion_route(live.now, body.get("model"), path)
        if companion is not None:
            return await beside(companion, path, body)
        if body.get("model") in (None, "") and not router.known:
            await router.refresh()  # no model named: the one serving, or asleep
        try:
            model, preset = resolve_route(
                live.now, body.get("model"), router.serving or router.asleep
            )
            if preset:
                body["reasoning_effort"] = preset
            body["model"] = model.name
            served = await asyncio.wait_for(router.acquire(model.name), ROUTE_WAIT_S)
        except RouteError as exc:
            return openai_error(exc.status, str(exc))
        except TimeoutError:
            return openai_error(503, f"{model.name} did not get its turn in {ROUTE_WAIT_S:.0f}s")
        headers = upstream_headers(key)
        content = json.dumps(body).encode()
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                answer = await link.send("POST", served.base_url, f"/v1/{path}", headers, content)
                break
            except NOTHING_ANSWERED as exc:
                # Refused: switched behind our back (say, by the CLI), so ask what serves and
                # wait for the model again. Any other: nothing came back on a kept-alive
                # connection, so the model never answered this request: send it again.
                moved = isinstance(exc, httpx.ConnectError)
                if attempt == SEND_ATTEMPTS:
                    await router.release(stale=moved)
                    return openai_error(502, f"{served.name} did not answer: {said(exc)}")
                if moved:
                    await router.release(stale=True)
                    try:
                        served = await asyncio.wait_for(router.acquire(model.name), ROUTE_WAIT_S)
                    except (TimeoutError, RouteError) as again:
                        return openai_error(503, str(again) or "timed out")
            except httpx.HTTPError as exc:
                await router.release(stale=True)
                return openai_error(502, f"{served.name} did not answer: {said(exc)}")
        return Relay(answer, passed(answer, KEPT_HEADERS), router.release)

    async def beside(companion: Model, path: str, body: dict[str, Any]) -> Any:
        """A companion's request: straight to its server, no switch (it runs beside the big
        model, or the admission keeps it stopped and the answer says why)."""
        body["model"] = companion.name
        content = json.dumps(body).encode()
        try:
            answer = await link.send(
                "POST", companion.base_url, f"/v1/{path}", upstream_headers(key), content
            )
        except httpx.HTTPError:
            status = await call("status")
            why = next(
                (c.get("why_not") for c in status.get("companions", [])
                 if c.get("name") == companion.name),
                None,
            )  # fmt: skip
            reason = f"stopped: {why}" if why else "not running"
            return openai_error(503, f"companion {companion.name} is {reason}")
        return Relay(answer, passed(answer, KEPT_HEADERS))

    for path in ROUTED:

        async def endpoint(request: Request, _path: str = path) -> Any:
            return await route(request, _path)

        app.add_api_route(
            f"/v1/{path}",
            endpoint,
            methods=["POST"],
            dependencies=[Depends(authorized)],
            name=f"v1_{path.replace('/', '_')}",
        )

    async def routed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A routed request, answered ahead of FastAPI's routing (see RoutedFirst)."""
        request = Request(scope, receive)
        if key is not None and not key_given(request, key):
            answer: Any = JSONResponse(
                {"detail": KEY_WANTED}, 401, headers={"WWW-Authenticate": "Bearer"}
            )
        else:
            answer = await route(request, scope["path"].removeprefix("/v1/"))
        await answer(scope, receive, send)

    app.add_middleware(RoutedFirst, paths={f"/v1/{path}" for path in ROUTED}, handle=routed)

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


def wake_app(router: Router, live: LiveContract, link: Any, key: str | None, wait_s: float) -> Any:
    """The wake listener (127.0.0.1, the front door's map points here while the model
    sleeps): any request wakes the sleeping model — with the key, when there is one; the web
    UI's page is public, as on llama-server — waits for it, at most `wait_s`, and goes on to
    it. Once it serves, the firewall sends the front door straight to it again."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    def refuse(status: int, message: str, retry: bool = False) -> JSONResponse:
        kind = "authentication_error" if status == 401 else "unavailable_error"
        return JSONResponse(
            {"error": {"code": status, "message": message, "type": kind}},
            status_code=status,
            headers={"Retry-After": "5"} if retry else None,
        )

    @app.api_route("/{path:path}", methods=methods)
    async def wake(request: Request, path: str) -> Any:
        public = request.method in ("GET", "HEAD") and request.url.path in ("/", "/index.html")
        if key is not None and not public and not key_given(request, key):
            return refuse(401, "Invalid API Key")
        if not router.known:
            await router.refresh()
        name = router.serving or router.asleep
        if name is None:
            return refuse(
                503,
                "llamavm: no model is serving (stopped) — 'invoke switch --model NAME' starts one",
                retry=True,
            )
        turn = asyncio.ensure_future(router.acquire(name))
        try:
            # Shielded: a request that stops waiting leaves the wake going for the next one.
            served = await asyncio.wait_for(asyncio.shield(turn), wait_s)
        except TimeoutError:
            turn.add_done_callback(_release_when_admitted(router))
            return refuse(
                503, f"llamavm: waking {name}, not ready after {wait_s:.0f}s — retry shortly",
                retry=True,
            )  # fmt: skip
        except RouteError as exc:
            return refuse(503, f"llamavm: {exc}", retry=True)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        target = f"/{path}" + (f"?{request.url.query}" if request.url.query else "")
        try:
            answer = await link.send(
                request.method, served.base_url, target, headers, await request.body()
            )
        except httpx.HTTPError as exc:
            await router.release(stale=True)
            return refuse(502, f"llamavm: {served.name} did not answer: {said(exc)}", retry=True)
        through = [(k, v) for k, v in answer.headers if k not in HOP_BY_HOP]
        return Relay(answer, through, router.release)

    return app


_BACKGROUND: set[asyncio.Future[None]] = set()


def _release_when_admitted(router: Router) -> Any:
    """For a wake nobody waits for any more: give back the turn it gets, if it gets one."""

    def done(turn: asyncio.Future[Model]) -> None:
        if not turn.cancelled() and turn.exception() is None:
            task = asyncio.ensure_future(router.release())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)

    return done


def dispatch(main: Any, wake: Any, wake_port: int) -> Any:
    """One ASGI application for both listeners: a request that came in on `wake_port` goes to
    the wake listener's application, everything else (and the lifespan) to the main one."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        server = scope.get("server") or (None, None)
        if scope["type"] == "http" and wake_port and server[1] == wake_port:
            await wake(scope, receive, send)
        else:
            await main(scope, receive, send)

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
    sockets = [listener(control.bind_address, control.port)]
    if control.wake_port:
        sockets.append(listener("127.0.0.1", control.wake_port))
    config = uvicorn.Config(
        dispatch(app, app.state.wake, control.wake_port),
        log_level="info",
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=CLIENT_KEEPALIVE_S,
    )
    logging.getLogger("uvicorn.access").addFilter(quiet_routes)
    uvicorn.Server(config).run(sockets=sockets)
    return 0
