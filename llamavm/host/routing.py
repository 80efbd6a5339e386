"""OpenAI-compatible routing (/v1): one model on the GPU at a time, the request's.

A request for the serving model goes straight through; one naming another catalog model waits
for the requests in flight, then switches to it (the helper's switch transaction), and every
request waiting for that model goes through together. `model:effort` picks a reasoning preset;
a companion's request (/v1/embeddings, /v1/rerank, or naming it) goes to its server beside the
big model, no switch. The answer is passed on as it comes (relay.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any, Protocol

import httpx  # Debian: python3-httpx (the control role installs it)
from fastapi import Request
from fastapi.responses import JSONResponse

from llamavm.host.auth import KEY_WANTED, key_given
from llamavm.host.contract import Contract, HostError, LiveContract, Model
from llamavm.host.relay import KEPT_HEADERS, Relay, passed, said

#: A routed request waits at most this long for its model (behind a switch and its queue).
ROUTE_WAIT_S = 900.0
ROUTED = ("chat/completions", "completions", "embeddings", "rerank")
#: The routed paths a companion of that task answers when a request names no model.
TASK_PATHS = {"embeddings": "embeddings", "rerank": "rerank"}
#: A routed request nothing answered (refused: the model moved; a kept-alive connection the
#: server had closed) is sent again, at most this many times in all.
SEND_ATTEMPTS = 3
#: Errors of a request to a model that got no response at all.
NOTHING_ANSWERED = (
    httpx.ConnectError,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)


class HelperCalls(Protocol):
    """The privileged helper as the router asks it (control.Helper: one request, its outcome)."""

    async def call(self, op: str, **fields: str) -> dict[str, Any]: ...


class RouteError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Moved(Exception):
    """What serves is no longer the model a request following the serving one waited for (a
    switch from elsewhere, a stop): it picks again."""


#: The stamp of what the helper last wrote (the state file's): a change says a switch, stop or
#: sleep happened here or elsewhere since the router last heard what serves.
Stamp = Callable[[], object]


class Router:
    """One model on the GPU at a time: requests for the serving model go straight through;
    one for another model waits for the requests in flight, then switches (one transaction),
    and every request waiting for that model goes through together. While a request waits for
    another model, new requests for the serving one queue behind it (no starvation)."""

    def __init__(self, contract: LiveContract, helper: HelperCalls,
                 stamp: Stamp | None = None) -> None:  # fmt: skip
        self.contract = contract
        self.helper = helper
        self.stamp = stamp
        self.stamp_seen: object = stamp() if stamp else None
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
        #: A transaction is under way, not this router's (the helper's status said so).
        self.pending = False
        self.refreshed = float("-inf")
        self.clock = time.monotonic
        self._asking: asyncio.Future[dict[str, Any]] | None = None

    async def _status(self) -> dict[str, Any]:
        """The helper's status; requests that ask at the same time share one answer."""
        if self._asking is None or self._asking.done():
            self._asking = asyncio.ensure_future(self.helper.call("status"))
        return await asyncio.shield(self._asking)

    async def _refresh(self) -> None:
        status = await self._status()
        self._heard(status)

    def _heard(self, status: dict[str, Any]) -> None:
        ok = bool(status.get("ok"))
        self.serving = status.get("active") if ok else None
        self.asleep = (status.get("asleep") or {}).get("model") if ok else None
        self.pending = bool(status.get("transaction")) if ok else False
        self.known = ok
        self.refreshed = self.clock()

    def notice(self) -> None:
        """What serves changed since the router heard it when the helper's stamp did (a
        switch over SSH or `docker exec`): ask again before the next request goes on."""
        if self.stamp is None:
            return
        now = self.stamp()
        if now != self.stamp_seen:
            self.stamp_seen = now
            if not self.switching:
                self.known = False

    async def refresh(self) -> None:
        """Ask the helper what serves (unless a switch of this router's is under way)."""
        async with self.cond:
            if self.switching:
                return
        status = await self._status()
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

    async def acquire(self, name: str, follow: bool = False) -> Model:
        """Wait until `name` serves, switching to it when its turn comes. `follow`: a request
        for whatever serves (the front door's), which wakes `name` when it sleeps but never
        switches to it: Moved when another model serves, none does, or a transaction not this
        router's is under way."""
        while True:
            async with self.cond:
                self.waiting[name] = self.waiting.get(name, 0) + 1
                try:
                    while True:
                        self.notice()
                        if not self.known and not self.switching:
                            await self._refresh()
                        if follow and self._moved(name):
                            raise Moved(name)
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
                        self.pending = False
                        self.batch = self.waiting.get(name, 0) + 1
                    else:
                        self.known, self.batch = False, 0
                    self.cond.notify_all()
            if not outcome.get("ok"):
                raise RouteError(
                    503, f"could not switch to {name}: {outcome.get('error', 'unknown error')}"
                )

    def _moved(self, name: str) -> bool:
        """For a request following the serving model: `name` neither serves nor sleeps, or
        somebody else's transaction is under way (wait for its outcome, then pick again)."""
        if self.switching or not self.known:
            return False
        return self.pending or (self.serving or self.asleep) != name

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

    async def ask(self, op: str, **fields: str) -> dict[str, Any]:
        """The helper's outcome of `op` (the API's status, switch, stop, restart), which the
        router follows (see observe)."""
        outcome = await self.helper.call(op, **fields)
        await self.observe(op, outcome)
        return outcome

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
                self.pending = False
            elif op == "stop":
                self.serving, self.known, self.asleep = None, True, None
                self.pending = False
            if op != "status":
                self.batch = 0
            self.cond.notify_all()

    async def release(self, stale: bool = False) -> None:
        async with self.cond:
            self.in_flight -= 1
            if stale:
                self.known = False
            self.cond.notify_all()


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


def upstream_headers(key: str | None) -> list[tuple[str, str]]:
    """A routed request's headers to the model: JSON, the key, and identity (the answer is
    passed on as it comes, so it must not be compressed)."""
    headers = [("Content-Type", "application/json"), ("Accept-Encoding", "identity")]
    if key is not None:
        headers.append(("Authorization", f"Bearer {key}"))
    return headers


def openai_error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status
    )


class Routes:
    """The /v1 endpoints of the control service (`on`: settings.control.routing): GET /v1/models
    and the routed POSTs, which `handle` answers ahead of FastAPI (see RoutedFirst). `link`
    sends a request to a model's server (upstream.py); `key`: the API key, None without one."""

    def __init__(
        self, live: LiveContract, router: Router, link: Any, key: str | None, on: bool
    ) -> None:
        self.live, self.router, self.link, self.key, self.on = live, router, link, key, on

    async def models(self) -> Any:
        """GET /v1/models."""
        if not self.on:
            return openai_error(404, "routing is off: set settings.control.routing: true")
        status = await self.router.ask("status")
        return model_list(self.live.now, status.get("active"))

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A routed request, answered ahead of FastAPI's routing (see RoutedFirst)."""
        request = Request(scope, receive)
        if self.key is not None and not key_given(request, self.key):
            answer: Any = JSONResponse(
                {"detail": KEY_WANTED}, 401, headers={"WWW-Authenticate": "Bearer"}
            )
        else:
            answer = await self.route(request, scope["path"].removeprefix("/v1/"))
        await answer(scope, receive, send)

    async def route(self, request: Request, path: str) -> Any:
        """POST /v1/`path`: the model the body names serves it (switched to, its turn come),
        or the companion it names; the answer relayed."""
        if not self.on:
            return openai_error(404, "routing is off: set settings.control.routing: true")
        router, link, live = self.router, self.link, self.live
        try:
            body = await request.json()
        except ValueError:
            return openai_error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return openai_error(400, "the request body must be a JSON object")
        companion = companion_route(live.now, body.get("model"), path)
        if companion is not None:
            return await self._beside(companion, path, body)
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
        headers = upstream_headers(self.key)
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

    async def _beside(self, companion: Model, path: str, body: dict[str, Any]) -> Any:
        """A companion's request: straight to its server, no switch (it runs beside the big
        model, or the admission keeps it stopped and the answer says why)."""
        body["model"] = companion.name
        content = json.dumps(body).encode()
        try:
            answer = await self.link.send(
                "POST", companion.base_url, f"/v1/{path}", upstream_headers(self.key), content
            )
        except httpx.HTTPError:
            status = await self.router.ask("status")
            why = next(
                (c.get("why_not") for c in status.get("companions", [])
                 if c.get("name") == companion.name),
                None,
            )  # fmt: skip
            reason = f"stopped: {why}" if why else "not running"
            return openai_error(503, f"companion {companion.name} is {reason}")
        return Relay(answer, passed(answer, KEPT_HEADERS))
