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
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx  # Debian: python3-httpx (the control role installs it)
from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from llamavm.host import EXIT_UNKNOWN, TX_PATTERN, picker
from llamavm.host import contract as contract_mod
from llamavm.host.contract import Contract, HostError, Model
from llamavm.host.helper import MAX_REQUEST, request_line

#: How the helper's outcome codes read over HTTP.
HTTP_STATUS = {0: 200, 1: 500, 2: 409, 3: 409, 4: 500, 5: 500, 6: 202}
#: A routed request waits at most this long for its model (behind a switch and its queue).
ROUTE_WAIT_S = 900.0
ROUTED = ("chat/completions", "completions", "embeddings")
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

    async def _refresh(self) -> None:
        status = await self.helper.call("status")
        self.serving = status.get("active") if status.get("ok") else None
        self.known = bool(status.get("ok"))

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
                        self.serving, self.known = name, True
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
            elif op == "status" or (op == "switch" and outcome.get("model")):
                self.serving = outcome.get("active") if op == "status" else outcome["model"]
                self.known = True
            elif op == "stop":
                self.serving, self.known = None, True
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


def model_list(contract: Contract, serving: str | None) -> dict[str, Any]:
    """/v1/models: every catalog model, and each reasoning preset as model:effort."""
    data = []
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


def create_app(
    contract: Contract,
    helper: Helper,
    key: str | None,
    upstream: Any = None,
    contract_path: Path | None = None,
) -> Any:
    """The FastAPI application. `upstream`: the httpx.AsyncClient that reaches the models;
    `contract_path`: the file to follow for models added or changed since the start."""
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
    client = upstream or httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None))
    router = Router(live, helper)

    def authorized(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("x-api-key", "")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise HTTPException(
                401,
                "this endpoint wants the API key: Authorization: Bearer KEY (or X-Api-Key)",
                headers={"WWW-Authenticate": "Bearer"},
            )

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
        try:
            model, preset = resolve_route(live.now, body.get("model"), router.serving)
            if preset:
                body["reasoning_effort"] = preset
            body["model"] = model.name
            served = await asyncio.wait_for(router.acquire(model.name), ROUTE_WAIT_S)
        except RouteError as exc:
            return openai_error(exc.status, str(exc))
        except TimeoutError:
            return openai_error(503, f"{model.name} did not get its turn in {ROUTE_WAIT_S:.0f}s")
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        content = json.dumps(body)
        for attempt in (1, 2):
            upstream_request = client.build_request(
                "POST", f"{served.base_url}/v1/{path}", headers=headers, content=content
            )
            try:
                answer = await client.send(upstream_request, stream=True)
                break
            except httpx.ConnectError as exc:  # switched behind our back (say, by the CLI)
                await router.release(stale=True)
                if attempt == 2:
                    return openai_error(502, f"{served.name} did not answer: {exc}")
                try:
                    served = await asyncio.wait_for(router.acquire(model.name), ROUTE_WAIT_S)
                except (TimeoutError, RouteError) as again:
                    return openai_error(503, str(again) or "timed out")
            except httpx.HTTPError as exc:
                await router.release(stale=True)
                return openai_error(502, f"{served.name} did not answer: {exc}")

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.aiter_bytes():
                    yield chunk
            finally:
                await answer.aclose()
                await router.release()

        keep = {"content-type", "cache-control"}
        return StreamingResponse(
            relay(),
            status_code=answer.status_code,
            headers={k: v for k, v in answer.headers.items() if k.lower() in keep},
        )

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

    @app.on_event("shutdown")
    async def close() -> None:
        await client.aclose()

    return app


def main(contract: Contract, path: Path = contract_mod.CONTRACT_PATH) -> int:
    """Run the control service (llamavm-control.service)."""
    import uvicorn  # Debian: python3-uvicorn

    if contract.control is None:
        raise HostError("the control service is off in the catalog (settings.control)", 2)
    app = create_app(
        contract,
        Helper(contract.control.helper_socket),
        read_key(contract),
        contract_path=path,
    )
    uvicorn.run(
        app,
        host=contract.control.bind_address,
        port=contract.control.port,
        log_level="info",
        proxy_headers=False,
        server_header=False,
    )
    return 0
