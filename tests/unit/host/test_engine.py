"""The container engine's API client (llamavm.host.engine) against a small engine on a unix
socket that answers as Docker's does, and the Compose runtime's reading of what it says
(runtime.ComposeRuntime): states, a crash, a stop, logs without frame headers, the stats."""

from __future__ import annotations

import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

import pytest

from llamavm.host.contract import HostError
from llamavm.host.engine import EngineApi, EngineError, demux
from llamavm.host.runtime import ComposeRuntime
from tests.unit.fakes.engine import LABEL, FakeEngine, compose_contract
from tests.unit.fakes.host import contracts, fake_systemd, host_on, switch_tx, warm_checks


def _frame(stream: int, text: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(text).to_bytes(4, "big") + text


CONTAINERS: dict[str, dict[str, Any]] = {
    "llamavm-one": {
        "State": {"Status": "running", "ExitCode": 0, "Pid": 4242, "OOMKilled": False,
                  "StartedAt": "2026-12-07T10:00:00Z"},
        "RestartCount": 0,
    },
    "llamavm-two": {
        "State": {"Status": "exited", "ExitCode": 139, "Pid": 0, "OOMKilled": False,
                  "StartedAt": "2026-12-07T09:00:00Z"},
        "RestartCount": 3,
    },
}  # fmt: skip


class Engine(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str, dict[str, list[str]]]]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self, method: str) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        self.seen.append((method, url.path, query))
        parts = url.path.strip("/").split("/")
        if url.path == "/containers/json":
            wanted = json.loads(query["filters"][0])["label"]
            assert query["all"] == ["1"] and wanted == [LABEL]
            rows = [{"Names": ["/" + n], "State": c["State"]["Status"],
                     "Status": f"Exited ({c['State']['ExitCode']}) 2 minutes ago"
                     if c["State"]["Status"] == "exited" else "Up 5 minutes"}
                    for n, c in CONTAINERS.items()]  # fmt: skip
            return self._send(200, json.dumps(rows).encode())
        name = parts[1] if len(parts) > 2 else ""
        if name not in CONTAINERS:
            return self._send(404, b'{"message": "No such container: ' + name.encode() + b'"}')
        action = parts[2]
        if action == "json":
            return self._send(200, json.dumps(CONTAINERS[name]).encode())
        if action == "start":
            if name == "llamavm-two":
                return self._send(500, b'{"message": "error gathering device information"}')
            return self._send(304 if CONTAINERS[name]["State"]["Status"] == "running" else 204)
        if action == "stop":
            return self._send(204)
        if action == "logs":
            body = _frame(1, b"loading model\n") + _frame(2, b"error: out of memory\n")
            return self._send(200, body, "application/vnd.docker.raw-stream")
        if action == "stats":
            stats = {"cpu_stats": {"cpu_usage": {"total_usage": 123456}},
                     "blkio_stats": {"io_service_bytes_recursive": [
                         {"op": "read", "value": 4096}, {"op": "write", "value": 10}]}}  # fmt: skip
            return self._send(200, json.dumps(stats).encode())
        return self._send(404, b'{"message": "page not found"}')

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")


@pytest.fixture
def api(tmp_path):
    path = str(tmp_path / "engine.sock")
    server = socketserver.ThreadingUnixStreamServer(path, Engine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Engine.seen = []
    yield EngineApi(path, timeout=5)
    server.shutdown()
    server.server_close()


def test_the_client_lists_inspects_starts_stops_and_reads_logs(api) -> None:
    assert [c["Names"] for c in api.containers(LABEL)] == [["/llamavm-one"], ["/llamavm-two"]]
    assert api.inspect("llamavm-one")["State"]["Pid"] == 4242
    assert api.inspect("nope") is None
    assert api.start("llamavm-one") == ""  # 304: it already runs
    assert "error gathering device information" in api.start("llamavm-two")
    api.stop("llamavm-one", 7)
    assert ("POST", "/containers/llamavm-one/stop", {"t": ["7"]}) in Engine.seen
    assert api.logs("llamavm-one", 5) == "loading model\nerror: out of memory\n"
    assert ("GET", "/containers/llamavm-one/logs", {"stdout": ["1"], "stderr": ["1"],
            "tail": ["5"]}) in Engine.seen  # fmt: skip
    assert api.usage("llamavm-one") == (123456, 4096)


def test_a_name_cannot_reach_another_endpoint(api) -> None:
    assert api.inspect("../../images/json") is None
    assert Engine.seen[-1][1] == "/containers/..%2F..%2Fimages%2Fjson/json"


def test_an_engine_that_is_not_there_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(EngineError, match=r"the container engine at .*missing\.sock"):
        EngineApi(str(tmp_path / "missing.sock"), timeout=1).inspect("x")
    assert issubclass(EngineError, HostError)


def test_log_frames_are_stripped_and_a_tty_stream_passes_as_it_is() -> None:
    assert demux(_frame(1, b"a\n") + _frame(2, b"b\n")) == b"a\nb\n"
    assert demux(b"plain tty output\n") == b"plain tty output\n"


def test_the_compose_runtime_reads_the_engine_in_systemds_words(api, tmp_path) -> None:
    contract = contracts(tmp_path, {"one": tmp_path / "1.gguf", "two": tmp_path / "2.gguf"})
    one, two = (m.__class__(**{**m.__dict__, "unit": f"llamavm-{m.name}"}) for m in contract.models)
    runtime = ComposeRuntime(api, LABEL)
    assert runtime.states([one, two]) == {"llamavm-one": "active", "llamavm-two": "failed"}
    look = runtime.look(one)
    assert (look.active, look.sub, look.pid, look.invocation) == (
        "active", "running", 4242, "2026-12-07T10:00:00Z")  # fmt: skip
    crashed = runtime.look(two)
    assert (crashed.active, crashed.sub, crashed.restarts) == ("failed", "failed", 3)
    assert "error gathering device information" in runtime.start(two)
    gone = one.__class__(**{**one.__dict__, "unit": "llamavm-gone"})
    assert runtime.look(gone).active == "inactive"
    assert "no container llamavm-gone" in runtime.start(gone)
    assert runtime.counters(one, 4242) == (123456, 4096) and runtime.counters(one, 0) is None
    assert "out of memory" in runtime.logs(one)


def test_a_switch_on_compose_goes_through_the_engine_only(tmp_path, monkeypatch) -> None:
    warm_checks(monkeypatch)
    base = contracts(tmp_path, {"one": tmp_path / "1.gguf", "two": tmp_path / "2.gguf"})
    fake = fake_systemd(base, serving=["one"])
    engine = FakeEngine(fake)
    host = host_on(compose_contract(base), fake, lambda line: None, engine=lambda s: engine)
    assert isinstance(host.runtime, ComposeRuntime)
    assert switch_tx(host).switch("two")["model"] == "two"
    moves = [c for c in engine.calls if c[0] in ("start", "stop")]
    assert moves == [("stop", "llamavm-model-one.service"), ("start", "llamavm-model-two.service")]
