"""Idle unload and wake (issue 24): the catalog key, the sleep transaction, the firewall while
a model sleeps, the control service's idle clock and its wake listener — against fakes of the
helper, systemd, nftables and the model servers. The real thing runs on the test bed
(tests/integration/test_idle.py)."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from llamavm.artifacts import contract
from llamavm.host import EXIT_REFUSED, control, firewall, idle, metrics, status, store
from llamavm.host.activity import activity, in_flight_of
from llamavm.host.contract import Firewall, HostError, LiveContract
from llamavm.host.contract import parse as parse_contract
from llamavm.host.idle import IdleClock, idle_step
from llamavm.host.transaction import Transaction
from llamavm.inputs import catalog
from tests.unit.fakes.catalog import VALID, catalog_file
from tests.unit.fakes.control import AUTH, KEY
from tests.unit.fakes.host import contracts, fake_systemd, host_on, warm_checks
from tests.unit.fakes.nft import FakeNft

# --- the catalog ---------------------------------------------------------------------------


def _catalog(tmp_path, idle: Any, *, front_door=True, routing=False, control_on=True):
    data = copy.deepcopy(VALID)
    data["models"][0]["idle_unload_s"] = idle
    data["settings"]["expose"] = {"front_door": {"enabled": front_door}}
    data["settings"]["control"] = {"enabled": control_on, "routing": routing}
    path = catalog_file(tmp_path, data)
    return path


def test_idle_unload_defaults_to_never_and_reaches_the_host_contract(tmp_path) -> None:
    cat = catalog.load(_catalog(tmp_path, 5))
    assert [m.idle_unload_s for m in cat.models] == [5, 0]
    host = parse_contract(contract.build(cat, {}))
    assert [m.idle_unload_s for m in host.models] == [5, 0]
    assert host.control is not None and host.control.wake_port == 8401
    assert host.firewall is not None and host.firewall.wake_port == 8401
    assert host.control.wake_wait_s == 120


@pytest.mark.parametrize("value", [-1, 604801, 10**30, "5", "never", True, 1.5, None, [5]])
def test_hostile_idle_values_are_refused_in_one_line(tmp_path, value) -> None:
    with pytest.raises(catalog.CatalogError) as caught:
        catalog.load(_catalog(tmp_path, value))
    message = str(caught.value)
    assert "models[0] (alpha).idle_unload_s" in message and "\n" not in message
    assert "604800" in message or "must be an integer" in message


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"control_on": False}, "needs the control service"),
        ({"front_door": False, "routing": False}, "nothing would wake the model"),
    ],
)
def test_an_idle_model_needs_something_to_wake_it(tmp_path, kwargs, fragment) -> None:
    with pytest.raises(catalog.CatalogError) as caught:
        catalog.load(_catalog(tmp_path, 30, **kwargs))
    assert fragment in str(caught.value) and "idle_unload_s" in str(caught.value)
    catalog.load(_catalog(tmp_path, 0, **kwargs))  # never idle: no such need
    catalog.load(_catalog(tmp_path, 30, front_door=False, routing=True))  # routing wakes it


def test_an_old_contract_without_the_idle_keys_still_parses(tmp_path) -> None:
    data = contract.build(catalog.load(_catalog(tmp_path, 5)), {})
    for model in data["models"]:
        del model["idle_unload_s"]
    del data["control"]["wake_port"], data["control"]["wake_wait_s"]
    del data["firewall"]["front_door"]["wake_port"]
    host = parse_contract(data)
    assert host.models[0].idle_unload_s == 0 and host.control.wake_port == 0


# --- the sleep transaction -----------------------------------------------------------------

FW = Firewall(
    unit="llamavm-firewall.service",
    table="llamavm",
    set="model_ports",
    front_door_map="front_door",
    front_door_port=8400,
    wake_port=8401,
)


class SleepyNft(FakeNft):
    def wake(self, fw: Firewall, ports: tuple[int, ...] | list[int] = ()) -> bool:
        self.state(fw)
        changed = sorted(self.ports) != sorted(ports) or self.front != fw.wake_port
        self.log.append("wake")
        self.ports, self.front = list(ports), fw.wake_port
        return changed


@pytest.fixture
def host_world(tmp_path, monkeypatch):
    """'one' (idle 5 s) serving, 'two'; the firewall with its front door and wake port."""
    warm_checks(monkeypatch)
    base = contracts(
        tmp_path, {"one": tmp_path / "one.gguf", "two": tmp_path / "two.gguf"}, firewall=FW
    )
    from dataclasses import replace

    models = (replace(base.models[0], idle_unload_s=5), base.models[1])
    host_contract = replace(base, models=models)
    fake = fake_systemd(host_contract, serving=["one"], active=[FW.unit])
    nft = SleepyNft([8001])
    events: list[str] = []
    flight = {"n": 0}
    host = host_on(
        host_contract,
        fake,
        events.append,
        open_ports=nft.set_open,
        firewall_state=nft.state,
        front_door_hold=nft.hold,
        front_door_wake=nft.wake,
    )
    host.in_flight = lambda model, key: flight["n"]  # type: ignore[method-assign]
    return SimpleNamespace(
        contract=host_contract, fake=fake, nft=nft, host=host, events=events, flight=flight
    )


def _state(world) -> dict[str, Any]:
    return store.load_state(world.contract.paths.state)


def test_sleep_stops_the_model_and_points_the_front_door_at_the_wake_listener(host_world) -> None:
    w = host_world
    result = Transaction(w.host, "sleep1", "sleep").sleep("one")
    assert result == {"changed": True, "asleep": "one", "stopped": ["one"]}
    assert w.fake.running_units() == []
    assert w.nft.ports == [] and w.nft.front == 8401
    assert w.nft.log == ["hold", "wake"]  # front-door requests wait from before the stop
    state = _state(w)
    assert state["asleep"]["model"] == "one" and state["asleep"]["idle_s"] == 5
    assert state["desired"] == "one" and state["stopped"] is False
    report = status.report(w.contract, w.fake)
    assert report["active"] is None and report["asleep"]["model"] == "one"
    text = metrics.collect(w.contract, w.fake, None, health=lambda url: None)
    assert 'llamavm_model_asleep{model="one"} 1' in text
    assert 'llamavm_model_asleep{model="two"} 0' in text


@pytest.mark.parametrize("serving", ["two", None])
def test_sleep_is_refused_for_a_model_that_does_not_serve(host_world, serving) -> None:
    w = host_world
    if serving:
        Transaction(w.host, "sw1", "switch").switch(serving)
    else:
        Transaction(w.host, "st1", "stop").stop()
    before = w.fake.running_units()
    with pytest.raises(HostError) as caught:
        Transaction(w.host, "sleep2", "sleep").sleep("one")
    assert caught.value.code == EXIT_REFUSED and "not what serves" in str(caught.value)
    assert w.fake.running_units() == before and _state(w)["asleep"] is None


def test_sleep_is_refused_while_a_request_is_in_flight(host_world) -> None:
    w = host_world
    w.flight["n"] = 1
    with pytest.raises(HostError) as caught:
        Transaction(w.host, "sleep3", "sleep").sleep("one")
    assert "in flight" in str(caught.value)
    assert w.fake.running_units() == ["llamavm-model-one.service"] and w.nft.ports == [8001]


class Killed(BaseException):
    """The sleep's process dies at a failpoint: nothing of it runs after that."""


def _killed_at(world, point: str) -> None:
    """A sleep whose process dies at `point` (its own clean-up never runs)."""

    def failpoint(name: str) -> None:
        if name == point:
            raise Killed(name)

    world.host.failpoint = failpoint
    tx = Transaction(world.host, "sleepk", "sleep")
    tx._end_sleep = lambda *args, **kwargs: None  # type: ignore[method-assign]
    with pytest.raises(Killed):
        tx.sleep("one")
    world.host.failpoint = lambda name: None
    assert _state(world)["pending"]["op"] == "sleep"  # recorded before anything changed


def test_a_sleep_killed_after_the_stop_is_finished_by_the_next_command(host_world) -> None:
    w = host_world
    _killed_at(w, "after_sleep_stop")
    assert w.fake.running_units() == [] and w.nft.log == ["hold"]  # nothing wakes it yet
    done = Transaction(w.host, "rec1", "recover").recover("killed")
    assert done["recovered"] == "sleepk" and done["outcome"]["asleep"] == "one"
    state = _state(w)
    assert state["pending"] is None and state["asleep"]["model"] == "one"
    assert state["desired"] == "one" and w.nft.front == 8401  # the front door wakes it
    assert store.read_outcome(w.contract.paths.outcomes, "sleepk")["ok"] is True
    assert Transaction(w.host, "rec2", "recover").recover("again") == {"changed": False}


def test_a_sleep_killed_before_the_stop_is_undone_by_the_next_command(host_world) -> None:
    w = host_world
    _killed_at(w, "before_sleep_stop")
    assert w.fake.running_units() == ["llamavm-model-one.service"]
    done = Transaction(w.host, "rec3", "recover").recover("killed")
    assert done["outcome"]["model"] == "one" and done["outcome"]["asleep"] is None
    state = _state(w)
    assert state["pending"] is None and state["asleep"] is None
    assert w.nft.front == 8001 and w.nft.ports == [8001]  # serving as before


def test_a_sleep_that_fails_before_the_stop_leaves_the_model_serving(host_world) -> None:
    w = host_world

    def failpoint(name: str) -> None:
        if name == "before_sleep_stop":
            raise RuntimeError("drain broke")

    w.host.failpoint = failpoint
    with pytest.raises(RuntimeError):
        Transaction(w.host, "sleepf", "sleep").sleep("one")
    state = _state(w)
    assert state["pending"] is None and state["asleep"] is None
    assert w.fake.running_units() == ["llamavm-model-one.service"] and w.nft.front == 8001


def test_a_switch_wakes_it_and_stop_or_boot_keep_the_record_right(host_world) -> None:
    w = host_world
    Transaction(w.host, "sleep4", "sleep").sleep("one")
    # A reboot while asleep: it stays asleep, the front door still wakes it.
    w.nft.front = None
    assert "sleeps" in Transaction(w.host, "boot1", "boot").boot()["why"]
    assert w.fake.running_units() == [] and w.nft.front == 8401
    # The expose role's firewall sync keeps it so too.
    assert Transaction(w.host, "exp1", "expose").sync_firewall()["open"] == []
    assert w.nft.front == 8401
    result = Transaction(w.host, "wake1", "switch").switch("one")
    assert result["model"] == "one" and w.nft.ports == [8001] and w.nft.front == 8001
    assert _state(w)["asleep"] is None
    Transaction(w.host, "sleep5", "sleep").sleep("one")
    Transaction(w.host, "stop1", "stop").stop()
    assert _state(w)["asleep"] is None and w.nft.front is None
    assert Transaction(w.host, "boot2", "boot").boot()["why"] == "stopped by the operator"


def test_the_wake_batch_closes_every_port_and_redirects_to_the_listener(monkeypatch) -> None:
    batches: list[str] = []
    listing = {"nftables": [{"set": {"name": "model_ports", "elem": [8001]}},
                            {"map": {"name": "front_door", "elem": [[8400, 8001]]}}]}  # fmt: skip

    def nft(args, stdin=None):
        if stdin is not None:
            batches.append(stdin)
        return SimpleNamespace(returncode=0, stdout=json.dumps(listing), stderr="")

    monkeypatch.setattr(firewall, "_nft", nft)
    assert firewall.wake(FW) is True
    assert batches == [
        "flush set inet llamavm model_ports\nflush map inet llamavm front_door\n"
        "add element inet llamavm front_door { 8400 : 8401 }\n"
    ]


# --- the idle clock ----------------------------------------------------------------------------

METRICS = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total {prompt}
llamacpp:tokens_predicted_total 7
llamacpp:n_decode_total 9
llamacpp:requests_processing {busy}
llamacpp:requests_deferred 0
"""


def test_activity_reads_the_counters_and_the_requests_under_way() -> None:
    assert activity(METRICS.format(prompt=3, busy=0)) == ((3.0, 7.0, 9.0), 0)
    assert activity(METRICS.format(prompt=3, busy=2)) == ((3.0, 7.0, 9.0), 2)
    assert activity("") is None
    assert activity("llamacpp:requests_processing 0\n") is None
    assert activity("llamacpp:prompt_tokens_total x\n") is None


def test_the_requests_in_flight_count_those_waiting_for_a_slot() -> None:
    """A switch drains these before its stop: with more requests than slots, most wait."""
    busy = METRICS.format(prompt=3, busy=2).replace("deferred 0", "deferred 30")
    assert in_flight_of(busy) == 32
    assert activity(busy) == ((3.0, 7.0, 9.0), 32)
    assert in_flight_of(METRICS.format(prompt=3, busy=0)) == 0
    assert in_flight_of("") == 0
    assert in_flight_of("llamacpp:requests_deferred nan-ish\n") == 0


def test_the_idle_clock_restarts_at_any_sign_of_a_request() -> None:
    clock = IdleClock()
    clock.observe("one", (1.0,), False, 100.0)
    clock.observe("one", (1.0,), False, 104.0)
    assert clock.idle_s(104.0) == 4.0 and not clock.due(5, 104.0)
    assert clock.due(5, 105.0) and not clock.due(0, 1e9)  # 0: never
    clock.observe("one", (2.0,), False, 105.0)  # a request came and went between two looks
    assert clock.idle_s(106.0) == 1.0
    clock.observe("one", (2.0,), True, 200.0)  # one under way (a long generation)
    assert not clock.due(5, 204.0)
    clock.observe("one", None, False, 300.0)  # could not tell: not idle
    assert clock.idle_s(300.0) == 0.0
    clock.observe("two", (2.0,), False, 301.0)  # another model starts its own clock
    assert clock.model == "two" and clock.idle_s(305.0) == 4.0
    clock.observe(None, None, False, 306.0)
    assert not clock.due(1, 1e9)


# --- the control service: the watcher and the wake listener -----------------------------------


class Helper:
    """The helper's side: 'alpha' (idle 5 s) serving; sleep, switch and status as the host."""

    def __init__(self) -> None:
        self.serving: str | None = "alpha"
        self.asleep: str | None = None
        self.calls: list[str] = []
        self.switch_s = 0.01
        self.fail_sleep = False
        #: A transaction from elsewhere (over SSH, `docker exec`) under way.
        self.pending = False

    async def events(self, op: str, **fields: str) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(op)
        if op == "status":
            asleep = {"model": self.asleep, "at": 0, "idle_s": 5} if self.asleep else None
            pending = {"tx": "t1", "op": "switch"} if self.pending else None
            yield {"event": "outcome", "ok": True, "code": 0, "active": self.serving,
                   "asleep": asleep, "transaction": pending, "models": []}  # fmt: skip
            return
        if op == "sleep":
            if self.fail_sleep or self.serving != fields["model"]:
                yield {"event": "outcome", "ok": False, "code": 2, "error": "busy"}
                return
            self.serving, self.asleep = None, fields["model"]
            yield {"event": "outcome", "ok": True, "code": 0, "asleep": fields["model"]}
            return
        self.serving = None
        await asyncio.sleep(self.switch_s)
        self.serving, self.asleep = fields.get("model"), None
        yield {"event": "outcome", "ok": True, "code": 0, "model": self.serving}

    async def call(self, op: str, **fields: str) -> dict[str, Any]:
        return await control.Helper.call(self, op, **fields)  # type: ignore[arg-type]


class Servers:
    """The model servers: /metrics and any path, only on the serving model's port."""

    def __init__(self, fake: Helper, host_contract) -> None:
        self.fake = fake
        self.ports = {m.port: m.name for m in host_contract.models}
        self.embed_up = True
        self.prompt = 0
        self.seen: list[tuple[str, str, str, bytes]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        name = self.ports.get(request.url.port)
        if request.url.port == 8011 and self.embed_up:
            name = "embed"
        elif name != self.fake.serving:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/metrics":
            return httpx.Response(200, text=METRICS.format(prompt=self.prompt, busy=0))
        self.seen.append((name, request.method, str(request.url), request.content))
        body = json.dumps({"model": name, "path": request.url.path}).encode()
        return httpx.Response(
            200, headers={"content-type": "application/json"}, stream=_Streamed(body)
        )


class _Streamed(httpx.AsyncByteStream):
    """A body that arrives as a stream, as a real server's does (read once, raw)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body


def _service(tmp_path, routing=True, wait_s=120, companion=False):
    data = copy.deepcopy(VALID)
    data["models"][0]["idle_unload_s"] = 5
    if companion:
        data["models"].append({"name": "embed", "gguf": "e.gguf", "port": 8011,
                               "companion": True, "task": "embeddings"})  # fmt: skip
    data["settings"]["expose"] = {"front_door": {"enabled": True, "wait_s": wait_s}}
    data["settings"]["control"] = {"routing": routing}
    path = catalog_file(tmp_path, data)
    host_contract = parse_contract(contract.build(catalog.load(path), {}))
    fake = Helper()
    servers = Servers(fake, host_contract)
    client = httpx.AsyncClient(transport=httpx.MockTransport(servers))
    app = control.create_app(host_contract, fake, KEY, upstream=client)
    return SimpleNamespace(app=app, fake=fake, servers=servers, client=client,
                           live=LiveContract(host_contract))  # fmt: skip


def _steps(service, times: list[float]) -> list[Any]:
    router = service.app.state.router
    clock = IdleClock()

    async def run() -> list[Any]:
        out = []
        for now in times:
            out.append(await idle_step(router, service.live, clock, service.client, KEY, now))
        return out

    return asyncio.run(run())


def test_the_watcher_puts_an_idle_model_to_sleep_once(tmp_path) -> None:
    service = _service(tmp_path)
    outcomes = _steps(service, [1000.0, 1003.0, 1005.0, 1006.0, 1010.0])
    assert [o and o["ok"] for o in outcomes] == [None, None, True, None, None]
    assert service.fake.calls.count("sleep") == 1 and service.fake.asleep == "alpha"
    router = service.app.state.router
    assert router.serving is None and router.asleep == "alpha"


def test_requests_keep_the_model_awake(tmp_path) -> None:
    service = _service(tmp_path)
    router = service.app.state.router
    clock = IdleClock()

    async def run() -> None:
        for now in range(1000, 1020):
            service.servers.prompt += 1 if now % 3 == 0 else 0  # a request every 3 s
            await idle_step(router, service.live, clock, service.client, KEY, float(now))
        router.in_flight = 1  # a routed request under way, its server quiet
        for now in range(1020, 1030):
            await idle_step(router, service.live, clock, service.client, KEY, float(now))

    asyncio.run(run())
    assert "sleep" not in service.fake.calls


def test_a_model_without_idle_unload_never_sleeps(tmp_path) -> None:
    service = _service(tmp_path)
    service.fake.serving = "beta"
    _steps(service, [float(t) for t in range(1000, 1100, 10)])
    assert "sleep" not in service.fake.calls


def test_a_refused_sleep_leaves_the_model_serving_and_the_watcher_asks_again(tmp_path) -> None:
    service = _service(tmp_path)
    service.fake.fail_sleep = True
    outcomes = _steps(service, [1000.0, 1005.0])
    assert outcomes[1]["ok"] is False and service.fake.serving == "alpha"
    assert service.app.state.router.known is False  # the next look asks the helper first


def test_the_wake_listener_wakes_the_model_and_passes_the_request_on(tmp_path) -> None:
    service = _service(tmp_path)
    service.fake.serving, service.fake.asleep = None, "alpha"
    with TestClient(service.app.state.wake) as wake:
        refused = wake.post("/v1/chat/completions", json={"messages": []})
        assert refused.status_code == 401 and service.fake.calls.count("switch") == 0
        answer = wake.post("/v1/chat/completions?x=1", json={"messages": []}, headers=AUTH)
        assert answer.status_code == 200 and answer.json() == {
            "model": "alpha",
            "path": "/v1/chat/completions",
        }
        assert service.fake.serving == "alpha" and service.fake.calls.count("switch") == 1
        name, method, url, body = service.servers.seen[-1]
        assert (name, method) == ("alpha", "POST") and url.endswith(":8001/v1/chat/completions?x=1")
        assert json.loads(body) == {"messages": []}
        # The web UI's page is public (as on llama-server): it wakes the model without a key.
        service.fake.serving, service.fake.asleep = None, "alpha"
        service.app.state.router.known = False
        assert wake.get("/").status_code == 200


def test_a_wake_that_takes_too_long_is_a_retryable_503_and_goes_on(tmp_path) -> None:
    service = _service(tmp_path, wait_s=1)
    service.fake.serving, service.fake.asleep = None, "alpha"
    service.fake.switch_s = 1.5
    with TestClient(service.app.state.wake) as wake:
        answer = wake.post("/completion", json={"prompt": "x"}, headers=AUTH)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
        assert "waking alpha" in answer.json()["error"]["message"]
        # the wake went on: the next request gets the model
        again = wake.post("/completion", json={"prompt": "x"}, headers=AUTH)
        assert again.status_code == 200 and service.fake.calls.count("switch") == 1
    assert service.app.state.router.in_flight == 0


def test_with_nothing_asleep_and_nothing_serving_the_wake_listener_says_so(tmp_path) -> None:
    service = _service(tmp_path)
    service.fake.serving = None
    with TestClient(service.app.state.wake) as wake:
        answer = wake.post("/v1/chat/completions", json={}, headers=AUTH)
    assert answer.status_code == 503 and "invoke switch" in answer.json()["error"]["message"]
    assert "switch" not in service.fake.calls


def test_a_routed_request_without_a_model_wakes_the_sleeping_one(tmp_path) -> None:
    service = _service(tmp_path)
    service.fake.serving, service.fake.asleep = None, "beta"
    with TestClient(service.app) as client:
        answer = client.post("/v1/completions", json={"prompt": "x"}, headers=AUTH)
    assert answer.status_code == 200 and answer.json()["model"] == "beta"


# --- the wake listener as the front door's upstream (Compose) ---------------------------------


def _later(seconds: float, change: Any) -> threading.Timer:
    timer = threading.Timer(seconds, change)
    timer.start()
    return timer


def test_a_switch_from_elsewhere_is_waited_through_and_the_new_model_answers(tmp_path) -> None:
    """A transaction not the control service's (a CLI switch) under way: a request waits for
    its outcome, then goes to the model it served — never back to the old one, no switch."""
    service = _service(tmp_path)
    stamp = [0]
    service.app.state.router.stamp = lambda: stamp[0]
    with TestClient(service.app.state.wake) as wake:
        assert wake.post("/completion", json={}, headers=AUTH).json()["model"] == "alpha"
        service.fake.serving, service.fake.pending = None, True
        stamp[0] += 1  # the CLI's transaction wrote its pending entry

        def done() -> None:
            service.fake.serving, service.fake.pending = "beta", False
            stamp[0] += 1

        timer = _later(0.5, done)
        started = time.monotonic()
        answer = wake.post("/completion", json={"prompt": "x"}, headers=AUTH)
        timer.join()
        assert answer.status_code == 200 and answer.json()["model"] == "beta"
        assert time.monotonic() - started >= 0.4
        assert "switch" not in service.fake.calls
        # Its stamp unchanged, a model that moved anyway is found by asking again.
        service.fake.serving = "alpha"
        answer = wake.post("/completion", json={"prompt": "y"}, headers=AUTH)
        assert answer.status_code == 200 and answer.json()["model"] == "alpha"
        assert "switch" not in service.fake.calls
    assert service.app.state.router.in_flight == 0


def test_a_switch_from_elsewhere_that_outlasts_the_wait_is_a_retryable_503(tmp_path) -> None:
    service = _service(tmp_path, wait_s=1)
    service.fake.serving, service.fake.pending = None, True
    with TestClient(service.app.state.wake) as wake:
        answer = wake.post("/completion", json={}, headers=AUTH)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert "not ready after 1s" in answer.json()["error"]["message"]
    assert "switch" not in service.fake.calls and service.app.state.router.in_flight == 0


def test_a_stopped_model_is_not_started_by_the_front_door(tmp_path) -> None:
    """`invoke stop` elsewhere: the router last heard alpha, the state's stamp moved."""
    service = _service(tmp_path)
    stamp = [0]
    service.app.state.router.stamp = lambda: stamp[0]
    with TestClient(service.app.state.wake) as wake:
        assert wake.get("/health", headers=AUTH).status_code == 200
        service.fake.serving = None
        stamp[0] += 1
        answer = wake.post("/completion", json={}, headers=AUTH)
    assert answer.status_code == 503 and "stopped" in answer.json()["error"]["message"]
    assert "switch" not in service.fake.calls


def test_a_companions_path_goes_to_the_companion_beside_the_big_model(tmp_path) -> None:
    service = _service(tmp_path, companion=True)
    with TestClient(service.app.state.wake) as wake:
        answer = wake.post("/v1/embeddings", json={"input": "x"}, headers=AUTH)
        assert answer.status_code == 200 and answer.json()["model"] == "embed"
        assert wake.post("/embedding", json={}, headers=AUTH).json()["model"] == "embed"
        assert wake.post("/v1/chat/completions", json={}, headers=AUTH).json()["model"] == "alpha"
        service.servers.embed_up = False
        down = wake.post("/v1/embeddings", json={"input": "x"}, headers=AUTH)
        assert down.status_code == 503 and down.headers["retry-after"] == "30"
        assert "embeddings companion embed is not running" in down.json()["error"]["message"]
        assert wake.post("/v1/embeddings", json={}).status_code == 401
    assert "switch" not in service.fake.calls and service.app.state.router.in_flight == 0


def test_a_front_door_request_follows_a_routed_switch_and_never_switches_back(tmp_path) -> None:
    """alpha serves a request; a routed one for beta waits for it; a front-door request that
    came meanwhile (for whatever serves: alpha then) gets beta after the switch, not a switch
    back to alpha."""
    service = _service(tmp_path)
    router = service.app.state.router

    async def run() -> tuple[str, str]:
        await router.refresh()
        await router.acquire("alpha")  # in flight
        routed = asyncio.ensure_future(router.acquire("beta"))
        await asyncio.sleep(0.05)
        front = asyncio.ensure_future(idle._serving_turn(router, time.monotonic() + 5, []))
        await asyncio.sleep(0.05)
        await router.release()  # alpha's request is done: beta's turn
        got = (await routed).name, (await front).name
        await router.release()
        await router.release()
        return got

    assert asyncio.run(asyncio.wait_for(run(), 10)) == ("beta", "beta")
    assert service.fake.calls.count("switch") == 1 and service.fake.serving == "beta"


def test_requests_that_ask_what_serves_at_once_share_one_status(tmp_path) -> None:
    service = _service(tmp_path)
    router = service.app.state.router

    async def run() -> None:
        await asyncio.gather(*(router.refresh() for _ in range(20)))

    asyncio.run(run())
    assert service.fake.calls.count("status") == 1 and router.serving == "alpha"


def test_requests_on_the_main_port_never_reach_the_wake_listener() -> None:
    seen: list[str] = []

    def app(name):
        async def asgi(scope, receive, send):
            seen.append(name)

        return asgi

    routed = control.dispatch(app("main"), app("wake"), 8401)
    for port in (8090, 8401):
        asyncio.run(routed({"type": "http", "server": ("127.0.0.1", port)}, None, None))
    asyncio.run(routed({"type": "lifespan"}, None, None))
    assert seen == ["main", "wake", "main"]
    unwoken = control.dispatch(app("main"), app("wake"), 0)
    asyncio.run(unwoken({"type": "http", "server": ("127.0.0.1", 0)}, None, None))
    assert seen[-1] == "main"


@pytest.mark.parametrize("close_wake", [True, False])
def test_on_a_host_the_wake_listener_lets_the_front_doors_connection_go(close_wake) -> None:
    """A host's front door reaches the wake listener only while no model is exposed: each
    answer closes the connection, so its next request dials again (straight to the model once
    exposed). On Compose the front door always comes here and keeps its connection."""

    async def wake(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"connection", b"keep-alive"), (b"x-a", b"1")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"ok"})

    async def main(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    routed = control.dispatch(main, wake, 8401, close_wake=close_wake)
    asyncio.run(routed({"type": "http", "server": ("127.0.0.1", 8401)}, None, send))
    asyncio.run(routed({"type": "http", "server": ("127.0.0.1", 8090)}, None, send))
    wake_head, body, main_head = sent
    closing = [(b"x-a", b"1"), (b"connection", b"close")]
    assert wake_head["headers"] == (closing if close_wake else [(b"connection", b"keep-alive"),
                                                                (b"x-a", b"1")])  # fmt: skip
    assert body == {"type": "http.response.body", "body": b"ok"}
    assert main_head["headers"] == [], "the control API's own answers are left alone"
