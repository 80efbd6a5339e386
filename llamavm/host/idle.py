"""Idle unload and wake: the control service's idle watcher and its wake listener.

A model with `idle_unload_s` in the catalog is put to sleep (the helper's `sleep` transaction:
stopped, GPU memory freed, still the chosen model) once its server has seen no request for that
long — its /metrics counters unchanged, nothing in flight there or through the service. While
it sleeps the firewall sends the front door to the wake listener (127.0.0.1 on the contract's
control.wake_port): any request there wakes the model, waits for it (at most
control.wake_wait_s, then a retryable 503) and is passed on; a routed /v1 request wakes it too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx  # Debian: python3-httpx (the control role installs it)
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from llamavm.host.activity import activity
from llamavm.host.auth import key_given
from llamavm.host.contract import COMPANION_PATHS, LiveContract, Model
from llamavm.host.relay import HOP_BY_HOP, Relay, said
from llamavm.host.routing import NOTHING_ANSWERED, Moved, RouteError, Router

#: The idle watcher looks at the serving model's counters this often, and asks the helper what
#: serves at least this often (a switch over SSH is not told to this service).
IDLE_TICK_S = 1.0
REFRESH_S = 30.0


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


def wake_app(router: Router, live: LiveContract, link: Any, key: str | None, wait_s: float) -> Any:
    """The wake listener: on a host, the front door's map points here while the model sleeps
    (127.0.0.1); on Compose, the front door sends every request here. A request goes to
    whichever model serves: through a switch under way (from anywhere) it waits; a sleeping
    model it wakes — with the key, when there is one; the web UI's page is public, as on
    llama-server; at most `wait_s`, then a retryable 503. A companion's path (/v1/embeddings,
    /v1/rerank, ...) goes to that companion beside the big model, as the host's front door
    sends it. "No model is serving" is said at once only when none serves, sleeps or is being
    switched to."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    def refuse(status: int, message: str, retry: bool = False, after: int = 5) -> JSONResponse:
        kind = "authentication_error" if status == 401 else "unavailable_error"
        return JSONResponse(
            {"error": {"code": status, "message": message, "type": kind}},
            status_code=status,
            headers={"Retry-After": str(after)} if retry else None,
        )

    @app.api_route("/{path:path}", methods=methods)
    async def wake(request: Request, path: str) -> Any:
        public = request.method in ("GET", "HEAD") and request.url.path in ("/", "/index.html")
        if key is not None and not public and not key_given(request, key):
            return refuse(401, "Invalid API Key")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        target = f"/{path}" + (f"?{request.url.query}" if request.url.query else "")
        body = await request.body()
        companion = beside(live, request.url.path)
        if companion is not None:
            try:
                answer = await link.send(request.method, companion.base_url, target, headers, body)
            except httpx.HTTPError:
                return refuse(
                    503, f"llamavm: the {companion.task} companion {companion.name} is not "
                    "running (invoke status says why) — retry later", retry=True, after=30,
                )  # fmt: skip
            return Relay(answer, [(k, v) for k, v in answer.headers if k not in HOP_BY_HOP])
        deadline = time.monotonic() + wait_s
        attempts = 0
        while True:
            picked: list[str] = []
            turn = asyncio.ensure_future(_serving_turn(router, deadline, picked))
            try:
                # Shielded: a request that stops waiting leaves the wake going for the next one.
                served = await asyncio.wait_for(
                    asyncio.shield(turn), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                turn.add_done_callback(_release_when_admitted(router))
                doing = (
                    f"waking {picked[-1]}"
                    if picked and picked[-1] == router.asleep
                    else ("no model serving")
                )
                return refuse(
                    503, f"llamavm: {doing}, not ready after {wait_s:.0f}s — retry shortly",
                    retry=True,
                )  # fmt: skip
            except RouteError as exc:
                return refuse(exc.status, f"llamavm: {exc}", retry=True)
            try:
                answer = await link.send(request.method, served.base_url, target, headers, body)
            except httpx.HTTPError as exc:
                await router.release(stale=True)
                # Nothing answered (refused, or closed before the answer's head): the model
                # stopped since this request was let through — a switch from elsewhere whose
                # drain did not see it yet. Ask again what serves, and go there.
                attempts += 1
                if (
                    isinstance(exc, NOTHING_ANSWERED)
                    and attempts < SEND_ATTEMPTS
                    and time.monotonic() < deadline - RETRY_S
                ):
                    await asyncio.sleep(RETRY_S)
                    continue
                why = f"llamavm: {served.name} did not answer: {said(exc)}"
                return refuse(502, why, retry=True)
            through = [(k, v) for k, v in answer.headers if k not in HOP_BY_HOP]
            return Relay(answer, through, router.release)

    return app


#: A request nothing answered is sent again, at most this many times in all (the front door's
#: requests wait through more switches than the routing endpoint's).
SEND_ATTEMPTS = 5
#: A request the serving model refused: asked again after this long; a switch under way from
#: elsewhere: its outcome looked for this often (the helper asked at most every POLL_ASK_S).
RETRY_S = 0.25
POLL_S = 0.1
POLL_ASK_S = 1.0


def beside(live: LiveContract, path: str) -> Model | None:
    """The companion a front-door request's path goes to (the catalog's first of the task
    whose paths it is), None for the big model."""
    for task, paths in COMPANION_PATHS.items():
        if path in paths:
            return next((m for m in live.now.companions if m.task == task), None)
    return None


async def _serving_turn(router: Router, deadline: float, picked: list[str]) -> Model:
    """A turn on whichever model serves: the one that sleeps is woken; a transaction under way
    from elsewhere is waited for (until `deadline`); RouteError(503) when nothing serves and
    nothing is being switched to."""
    while True:
        router.notice()
        if not router.known or (
            router.pending and time.monotonic() - router.refreshed >= POLL_ASK_S
        ):
            await router.refresh()
        if router.switching or router.pending:
            if time.monotonic() >= deadline:
                raise TimeoutError
            await asyncio.sleep(POLL_S)
            continue
        name = router.serving or router.asleep
        if name is None:
            raise RouteError(
                503, "no model is serving (stopped) — 'invoke switch --model NAME' starts one"
            )
        picked.append(name)
        try:
            return await router.acquire(name, follow=True)
        except Moved:
            continue


_BACKGROUND: set[asyncio.Future[None]] = set()


def _release_when_admitted(router: Router) -> Any:
    """For a wake nobody waits for any more: give back the turn it gets, if it gets one."""

    def done(turn: asyncio.Future[Model]) -> None:
        if not turn.cancelled() and turn.exception() is None:
            task = asyncio.ensure_future(router.release())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)

    return done
