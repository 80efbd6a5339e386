"""The control service (llamavm/host/control.py) against a fake privileged helper and fake
model servers: the key on every endpoint, outcomes as HTTP, server-sent progress, and the
router that keeps one model serving while requests name two. The real helper, systemd and
llama-server are exercised on the test bed (tests/integration/test_control.py)."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import logging
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from llamavm.artifacts import contract
from llamavm.host import control, helper, protocol
from llamavm.host.contract import HostError
from llamavm.host.contract import parse as parse_contract
from llamavm.host.routing import SEND_ATTEMPTS
from llamavm.inputs import catalog
from tests.unit.fakes.catalog import VALID, catalog_file
from tests.unit.fakes.control import AUTH, KEY, FakeHelper, Upstream, control_app, control_contract

PROTECTED = [
    ("get", "/models", None),
    ("get", "/status", None),
    ("post", "/switch", {"model": "beta"}),
    ("post", "/stop", None),
    ("post", "/restart", None),
    ("get", "/transactions/abcdef123456", None),
    ("get", "/v1/models", None),
    ("post", "/v1/chat/completions", {"model": "alpha", "messages": []}),
    ("post", "/v1/completions", {"model": "alpha", "prompt": "x"}),
    ("post", "/v1/embeddings", {"model": "alpha", "input": "x"}),
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_every_endpoint_but_the_public_ones_wants_the_key(tmp_path, method, path, body) -> None:
    app, _, _ = control_app(tmp_path)
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Api-Key": "wrong"}):
            answer = client.request(method, path, json=body, headers=headers)
            assert answer.status_code == 401, (path, headers)
            assert answer.headers["www-authenticate"] == "Bearer"
        for headers in (AUTH, {"X-Api-Key": KEY}):
            answer = client.request(method, path, json=body, headers=headers)
            assert answer.status_code == 200, (path, answer.text)


@pytest.mark.parametrize("path", ["/health", "/", "/openapi.json", "/docs"])
def test_health_the_page_and_the_docs_are_public(tmp_path, path) -> None:
    app, _, _ = control_app(tmp_path)
    with TestClient(app) as client:
        assert client.get(path).status_code == 200


def test_without_a_key_policy_nothing_asks_for_one(tmp_path) -> None:
    app, _, _ = control_app(tmp_path, key=None, policy="none")
    with TestClient(app) as client:
        assert client.get("/models").status_code == 200


def test_models_lists_the_catalog_with_verdicts_presets_and_what_serves(tmp_path) -> None:
    app, _, _ = control_app(tmp_path)
    with TestClient(app) as client:
        answer = client.get("/models", headers=AUTH).json()
    assert answer["active"] == "alpha"
    names = {m["name"]: m for m in answer["models"]}
    assert names["alpha"]["active"] and not names["beta"]["active"]
    assert names["beta"]["reasoning"] == {"effort": "low", "presets": ["low", "high"]}
    assert names["alpha"]["loads"] == [0.5] and names["alpha"]["aliases"] == ["a"]


def test_a_switch_runs_one_transaction_and_answers_its_outcome(tmp_path) -> None:
    app, fake, _ = control_app(tmp_path)
    with TestClient(app) as client:
        answer = client.post("/switch", json={"model": "b"}, headers=AUTH)
    assert answer.status_code == 200 and answer.json()["model"] == "beta"
    assert fake.calls == [("switch", {"model": "beta"})]  # the alias resolved to the name


def test_a_switch_streams_its_progress_as_server_sent_events(tmp_path) -> None:
    app, _, _ = control_app(tmp_path)
    with TestClient(app) as client:
        answer = client.post("/switch?stream=true", json={"model": "beta"}, headers=AUTH)
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = [
        (block.split("\n")[0].removeprefix("event: "), json.loads(block.split("data: ", 1)[1]))
        for block in answer.text.strip().split("\n\n")
    ]
    assert [kind for kind, _ in events] == ["progress", "progress", "outcome"]  # one outcome
    assert events[-1][1]["ok"] is True and events[-1][1]["model"] == "beta"


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        ({"ok": False, "code": 2, "error": "checks failed: the file is gone"}, 409),
        ({"ok": False, "code": 3, "error": "lock timeout"}, 409),
        ({"ok": False, "code": 1, "error": "the new model failed; rolled back"}, 500),
        ({"ok": False, "code": 5, "error": "unknown"}, 500),
    ],
)
def test_a_failed_transaction_reads_as_an_http_error(tmp_path, outcome, status) -> None:
    app, _, _ = control_app(tmp_path, fake=FakeHelper(fail=outcome))
    with TestClient(app) as client:
        answer = client.post("/switch", json={"model": "beta"}, headers=AUTH)
    assert answer.status_code == status and answer.json()["error"] == outcome["error"]


@pytest.mark.parametrize("body", [{"model": "nope"}, {"model": ""}, {}, {"model": 3}, []])
def test_a_bad_switch_request_is_refused_before_the_helper(tmp_path, body) -> None:
    app, fake, _ = control_app(tmp_path)
    with TestClient(app) as client:
        answer = client.post("/switch", json=body, headers=AUTH)
    assert answer.status_code in (404, 422), answer.text
    assert fake.calls == []


def test_an_unreachable_helper_is_a_clear_error(tmp_path) -> None:
    host = control_contract(tmp_path)
    app = control.create_app(host, control.Helper(tmp_path / "absent.sock"), KEY)
    with TestClient(app) as client:
        answer = client.post("/stop", headers=AUTH)
    assert answer.status_code == 500 and "llamavm-switchd.socket" in answer.json()["error"]


def test_with_routing_off_v1_says_how_to_turn_it_on(tmp_path) -> None:
    app, fake, _ = control_app(tmp_path, routing=False)
    with TestClient(app) as client:
        answer = client.post("/v1/chat/completions", json={"model": "beta"}, headers=AUTH)
    assert answer.status_code == 404
    assert "settings.control.routing" in answer.json()["error"]["message"]
    assert not [c for c in fake.calls if c[0] == "switch"]


def test_v1_models_lists_every_model_and_its_presets(tmp_path) -> None:
    app, _, _ = control_app(tmp_path)
    with TestClient(app) as client:
        ids = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert ids == ["alpha", "beta", "beta:low", "beta:high"]


def test_a_request_naming_another_model_switches_first(tmp_path) -> None:
    app, fake, upstream = control_app(tmp_path)
    with TestClient(app) as client:
        body = {"model": "b:high", "messages": [{"role": "user", "content": "hi"}]}
        answer = client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert answer.status_code == 200 and answer.json()["model"] == "beta"
        answer = client.post("/v1/completions", json={"model": "alpha"}, headers=AUTH)
        assert answer.status_code == 200 and answer.json()["model"] == "alpha"
    assert [c for c in fake.calls if c[0] == "switch"] == [
        ("switch", {"model": "beta"}),
        ("switch", {"model": "alpha"}),
    ]
    name, sent, auth = upstream.seen[0]
    assert name == "beta" and sent["model"] == "beta" and sent["reasoning_effort"] == "high"
    assert auth == f"Bearer {KEY}"  # the model servers want the key too


@pytest.mark.parametrize(
    ("model", "status", "fragment"),
    [("nope", 404, "no model named"), ("beta:extreme", 400, "no reasoning preset"),
     ("alpha:low", 400, "no reasoning preset"), (7, 400, "must be a string")],
)  # fmt: skip
def test_a_bad_routed_model_is_refused_without_a_switch(tmp_path, model, status, fragment) -> None:
    app, fake, _ = control_app(tmp_path)
    with TestClient(app) as client:
        answer = client.post("/v1/chat/completions", json={"model": model}, headers=AUTH)
    assert answer.status_code == status and fragment in answer.json()["error"]["message"]
    assert not [c for c in fake.calls if c[0] == "switch"]


def test_a_request_body_that_is_not_a_json_object_is_a_400(tmp_path) -> None:
    app, _, _ = control_app(tmp_path)
    with TestClient(app) as client:
        for content in (b"{", b"[1, 2]"):
            answer = client.post("/v1/completions", content=content, headers=AUTH)
            assert answer.status_code == 400


def test_a_burst_naming_two_models_all_succeeds_with_few_switches(tmp_path) -> None:
    app, fake, upstream = control_app(tmp_path)

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://control") as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/completions", json={"model": ("alpha", "beta")[i % 2]}, headers=AUTH
                    )
                    for i in range(20)
                )
            )

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200] * 20
    assert [a.json()["model"] for a in answers] == [("alpha", "beta")[i % 2] for i in range(20)]
    switches = [c for c in fake.calls if c[0] == "switch"]
    assert 1 <= len(switches) <= 4, switches  # waiting requests go through together
    assert len(upstream.seen) == 20


def test_a_switch_behind_the_routers_back_is_followed(tmp_path) -> None:
    app, fake, _ = control_app(tmp_path)
    with TestClient(app) as client:
        assert client.post("/v1/completions", json={"model": "alpha"}, headers=AUTH).is_success
        fake.serving = "beta"  # say, `invoke switch` from the CLI
        answer = client.post("/v1/completions", json={"model": "alpha"}, headers=AUTH)
    assert answer.status_code == 200 and answer.json()["model"] == "alpha"


class Dropping(Upstream):
    """Model servers that close `drops` kept-alive connections before answering (the race a
    client loses when it sends just as the server lets an idle connection go)."""

    def __init__(self, fake: FakeHelper, host_contract, drops: int) -> None:
        super().__init__(fake, host_contract)
        self.drops = drops
        self.sent = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        if self.drops:
            self.drops -= 1
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return super().__call__(request)


@pytest.mark.parametrize(("drops", "status"), [(0, 200), (1, 200), (2, 200), (3, 502)])
def test_a_routed_request_nothing_answered_is_sent_again(tmp_path, drops, status) -> None:
    host, fake = control_contract(tmp_path), FakeHelper()
    upstream = Dropping(fake, host, drops)
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    app = control.create_app(host, fake, KEY, upstream=client)
    with TestClient(app) as http:
        answer = http.post("/v1/completions", json={"model": "alpha"}, headers=AUTH)
        assert answer.status_code == status, answer.text
        assert upstream.sent == min(drops + 1, SEND_ATTEMPTS)
        if status == 502:
            assert "alpha did not answer: Server disconnected" in answer.json()["error"]["message"]
        assert [c[0] for c in fake.calls] == ["status"]  # asked once what serves; no switch
        # the turn was given back: the next request (another model) may switch
        assert http.post("/v1/completions", json={"model": "beta"}, headers=AUTH).is_success
    assert fake.serving == "beta"


@pytest.mark.parametrize(
    ("path", "kept"),
    [("/v1/chat/completions", False), ("/v1/completions", False), ("/switch", True),
     ("/status", True), ("/", True)],
)  # fmt: skip
def test_the_access_log_keeps_the_api_not_the_routed_requests(path, kept) -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("10.0.0.5:5000", "POST", path, "1.1", 200), None,
    )  # fmt: skip
    assert control.quiet_routes(record) is kept


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_after_an_api_switch_a_routed_request_goes_straight_through(tmp_path, stream) -> None:
    app, fake, _ = control_app(tmp_path)
    with TestClient(app) as client:
        assert client.post("/v1/completions", json={"model": "alpha"}, headers=AUTH).is_success
        switched = client.post(f"/switch?stream={str(stream).lower()}", json={"model": "beta"},
                               headers=AUTH)  # fmt: skip
        assert switched.status_code == 200
        fake.calls.clear()
        answer = client.post("/v1/completions", json={"model": "beta"}, headers=AUTH)
        assert answer.status_code == 200 and answer.json()["model"] == "beta"
        assert fake.calls == []  # no status asked, no second transaction
        assert client.post("/stop", headers=AUTH).is_success
        answer = client.post("/v1/completions", json={"model": "beta"}, headers=AUTH)
        assert answer.status_code == 200 and answer.json()["model"] == "beta"
    assert [c[0] for c in fake.calls] == ["stop", "switch"]


def test_a_failed_api_switch_makes_the_router_ask_again(tmp_path) -> None:
    fake = FakeHelper()
    app, fake, _ = control_app(tmp_path, fake=fake)
    with TestClient(app) as client:
        assert client.post("/v1/completions", json={"model": "alpha"}, headers=AUTH).is_success
        fake.fail = {"ok": False, "code": 1, "error": "rolled back"}
        assert client.post("/switch", json={"model": "beta"}, headers=AUTH).status_code == 500
        fake.fail, fake.calls = None, []
        assert client.post("/v1/completions", json={"model": "alpha"}, headers=AUTH).is_success
    assert [c[0] for c in fake.calls] == ["status"]


@pytest.mark.parametrize(
    "line",
    [b"", b"{}\n", b"not json\n", b'{"op": "reboot"}\n', b'{"op": "switch"}\n',
     b'{"op": "switch", "model": 3}\n', b'{"op": "result"}\n', b"[1]\n",
     b'{"op": "stop", "tx": "../x"}\n', b'{"op": "result", "tx": "ABCDEF"}\n',
     b'{"op": "switch", "model": "qwen", "tx": 7}\n',
     b'{"op": "status"' + b" " * 5000 + b"}\n"],
)  # fmt: skip
def test_the_helper_refuses_a_malformed_request(line) -> None:
    with pytest.raises(HostError) as caught:
        protocol.parse(line)
    assert caught.value.code == 2


def test_the_helper_accepts_its_requests() -> None:
    assert protocol.parse(protocol.request_line("switch", model="qwen")) == {
        "op": "switch",
        "model": "qwen",
    }
    assert protocol.parse(b'{"op": "status"}\n') == {"op": "status"}
    named = protocol.request_line("stop", tx="abcdef123456")
    assert protocol.parse(named) == {"op": "stop", "tx": "abcdef123456"}


def test_the_helper_client_relays_progress_and_exactly_one_outcome(tmp_path) -> None:
    """control.Helper against a unix socket that speaks the helper's protocol."""
    sock = tmp_path / "helper.sock"
    host = control_contract(tmp_path)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = protocol.parse(await reader.readline())
        for message in ("stopping alpha", "starting beta"):
            writer.write(json.dumps({"event": "progress", "message": message}).encode() + b"\n")
        outcome = {"event": "outcome", "ok": True, "code": 0, "model": request["model"]}
        writer.write(json.dumps(outcome).encode() + b"\n")
        await writer.drain()
        writer.close()

    async def run() -> tuple[httpx.Response, httpx.Response]:
        server = await asyncio.start_unix_server(answer, path=str(sock))
        app = control.create_app(host, control.Helper(sock), KEY)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://control") as client:
            body = {"model": "beta"}
            streamed = await client.post("/switch?stream=true", json=body, headers=AUTH)
            plain = await client.post("/switch", json=body, headers=AUTH)
        server.close()
        return streamed, plain

    streamed, plain = asyncio.run(run())
    assert streamed.text.count("event: outcome") == 1, streamed.text
    assert streamed.text.count("event: progress") == 2
    assert '"ok": true' in streamed.text.split("event: outcome")[1]
    assert plain.status_code == 200 and plain.json()["model"] == "beta"


def _contract_file(tmp_path, extra: list[dict[str, Any]] | None = None, name="models.yaml"):
    """The host contract file `invoke provision` writes, with `extra` catalog models."""
    data = copy.deepcopy(VALID)
    data["settings"]["api_key"]["policy"] = "required"
    data["settings"]["control"] = {"routing": True}
    data["models"] += extra or []
    source = catalog_file(tmp_path, data, name)
    built = contract.build(catalog.load(source), {})
    path = tmp_path / "contract.json"
    path.write_text(json.dumps(built))
    return path


def test_a_model_provisioned_after_the_start_is_known_at_once(tmp_path) -> None:
    """`invoke provision` adds a model: the running service switches and lists it (no restart:
    the CLI's switch goes through this API and must see what the helper sees)."""
    path = _contract_file(tmp_path)
    host = parse_contract(json.loads(path.read_text()))
    fake = FakeHelper()
    app = control.create_app(host, fake, KEY, contract_path=path)
    gamma = {**copy.deepcopy(VALID["models"][0]), "name": "gamma", "port": 8093, "aliases": []}
    with TestClient(app) as client:
        assert client.post("/switch", json={"model": "gamma"}, headers=AUTH).status_code == 404
        _contract_file(tmp_path, [gamma], name="models.more.yaml")
        answer = client.post("/switch", json={"model": "gamma"}, headers=AUTH)
        assert answer.status_code == 200, answer.text
        listed = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
        names = [m["name"] for m in client.get("/models", headers=AUTH).json()["models"]]
    assert fake.calls[0] == ("switch", {"model": "gamma"})
    assert "gamma" in listed and "gamma" in names


def test_a_malformed_contract_rewrite_keeps_the_last_good_one(tmp_path, capsys) -> None:
    path = _contract_file(tmp_path)
    host = parse_contract(json.loads(path.read_text()))
    app = control.create_app(host, FakeHelper(), KEY, contract_path=path)
    path.write_text('{"models": ')
    with TestClient(app) as client:
        answer = client.post("/switch", json={"model": "beta"}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert "kept the last good contract" in capsys.readouterr().out


def test_the_helper_answers_a_refused_switch_and_exits_0(tmp_path) -> None:
    """The refusal is the caller's news: a failed llamavm-switchd@ instance would leave the
    host's systemd degraded."""
    host = control_contract(tmp_path)
    reader = io.BytesIO(protocol.request_line("switch", model="nope"))
    writer = io.BytesIO()
    writer.close = lambda: None  # type: ignore[method-assign]
    assert helper.serve(host, reader, writer) == 0
    outcome = json.loads(writer.getvalue().splitlines()[-1])
    assert outcome["event"] == "outcome" and outcome["code"] == 2
    assert outcome["error"].startswith("no model named 'nope'")
