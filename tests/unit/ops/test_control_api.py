"""`invoke switch` through the control API (llamavm/ops/control_api.py) against the real control
application (llamavm/host/control.py, served by uvicorn on a loopback port) with a fake helper;
the SSH seam (remote.run/transaction/outcome) is faked. The real path, systemd and SSH included,
runs on the test bed (tests/integration/test_control.py)."""

from __future__ import annotations

import asyncio
import copy
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from llamavm.host import control
from llamavm.inputs import catalog
from llamavm.ops import control_api, remote
from tests.unit.fakes.catalog import VALID, catalog_file
from tests.unit.fakes.control import KEY, FakeHelper, control_app


class Server:
    """The control app on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class FakeSsh:
    """remote.run (the key's `cat`), remote.transaction and remote.outcome, recorded."""

    def __init__(self, key: str = KEY) -> None:
        self.key = key
        self.calls: list[tuple] = []

    def run(self, host, argv, *, stream=True, timeout=None):
        self.calls.append(("run", tuple(argv)))
        return subprocess.CompletedProcess(argv, 0, self.key + "\n", "")

    def transaction(self, host, op, args, *, stream=True):
        self.calls.append(("transaction", op, tuple(args)))
        return 0, {"ok": True, "code": 0, "via": "ssh"}

    def outcome(self, host, tx, *, stream=True, give_up_s=0):
        self.calls.append(("outcome", tx))
        return 0, {"ok": True, "code": 0, "tx": tx, "reconnected": True}


@pytest.fixture
def ssh(monkeypatch, tmp_path) -> Iterator[FakeSsh]:
    fake = FakeSsh()
    monkeypatch.setattr(remote, "run", fake.run)
    monkeypatch.setattr(remote, "transaction", fake.transaction)
    monkeypatch.setattr(remote, "outcome", fake.outcome)
    monkeypatch.setenv("LLAMAVM_STATE", str(tmp_path / "state"))
    monkeypatch.delenv(control_api.VIA_ENV, raising=False)
    yield fake


def _host(port_unused: int = 0, ssh_args=()) -> remote.Host:
    return remote.Host("box", "127.0.0.1", None, None, None, tuple(ssh_args))


def _settings(tmp_path, port: int, policy: str = "required"):
    data = copy.deepcopy(VALID)
    data["settings"]["api_key"]["policy"] = policy
    path = catalog_file(tmp_path, data, "catalog.yaml")
    settings = catalog.load(path).settings
    return replace(settings, control=replace(settings.control, port=port))


def test_a_switch_goes_through_the_api_with_its_progress_and_outcome(tmp_path, ssh, capsys) -> None:
    app, fake, _ = control_app(tmp_path)
    with Server(app) as server:
        settings = _settings(tmp_path, server.port)
        code, answer = control_api.transaction(_host(), settings, "switch", ["beta"], stream=True)
    assert (code, answer["model"], answer["changed"]) == (0, "beta", True)
    op, fields = fake.calls[-1]
    assert op == "switch" and fields["model"] == "beta"
    assert len(fields["tx"]) == 12  # the controller named the transaction
    assert capsys.readouterr().err.splitlines() == ["switch begins", "switch done"]
    # The key came over SSH once and is kept 0600 in a 0700 folder; no SSH transaction ran.
    assert [c[0] for c in ssh.calls] == ["run"]
    kept = list((tmp_path / "state" / "keys").iterdir())
    assert len(kept) == 1 and kept[0].read_text().strip() == KEY
    assert stat.S_IMODE(kept[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(kept[0].parent.stat().st_mode) == 0o700


def test_a_compose_project_is_switched_through_its_control_api_too(tmp_path, ssh, capsys) -> None:
    """A host reached through the engine (a Compose project's switchd) takes the same path as
    a systemd host's: its control service's API, the key read where switchd sees it; with the
    API down, the transaction runs in switchd (docker exec) and the note says so."""
    app, fake, _ = control_app(tmp_path)
    compose = replace(_host(), via=("docker", "exec", "-i", "llamavm-switchd"),
                      key_file="/srv/llamavm/secrets/api-key")  # fmt: skip
    with Server(app) as server:
        settings = _settings(tmp_path, server.port)
        code, answer = control_api.transaction(compose, settings, "switch", ["beta"], stream=False)
    assert (code, answer["model"]) == (0, "beta") and fake.calls[-1][0] == "switch"
    assert ssh.calls == [("run", ("cat", "/srv/llamavm/secrets/api-key"))]
    settings = _settings(tmp_path, server.port)  # nothing listens there now
    code, _ = control_api.transaction(compose, settings, "stop", [], stream=False)
    assert code == 0 and ssh.calls[-1] == ("transaction", "stop", ())


def test_the_cached_key_is_used_and_a_rotated_one_fetched_again(tmp_path, ssh) -> None:
    app, fake, _ = control_app(tmp_path)
    with Server(app) as server:
        settings = _settings(tmp_path, server.port)
        control_api.transaction(_host(), settings, "switch", ["beta"], stream=False)
        control_api.transaction(_host(), settings, "stop", [], stream=False)
        assert [c[0] for c in ssh.calls] == ["run"]  # once
        key_file = next((tmp_path / "state" / "keys").iterdir())
        key_file.write_text("an-old-rotated-key-0123456789\n")
        code, answer = control_api.transaction(_host(), settings, "switch", ["alpha"], stream=False)
    assert code == 0 and answer["model"] == "alpha"
    assert [c[0] for c in ssh.calls] == ["run", "run"]  # the 401 fetched it again
    assert key_file.read_text().strip() == KEY
    assert [op for op, _ in fake.calls] == ["switch", "stop", "switch"]


def test_a_key_refused_twice_falls_back_to_ssh_before_anything_ran(tmp_path, ssh, capsys) -> None:
    ssh.key = "not-the-hosts-key-0123456789"
    app, fake, _ = control_app(tmp_path)
    with Server(app) as server:
        settings = _settings(tmp_path, server.port)
        code, answer = control_api.transaction(_host(), settings, "switch", ["beta"], stream=True)
    assert (code, answer["via"]) == (0, "ssh")
    assert fake.calls == []
    assert ssh.calls[-1] == ("transaction", "switch", ("beta",))
    assert "refused the API key; switching over SSH instead" in capsys.readouterr().err


def test_no_control_service_listening_is_ssh_without_a_word(
    tmp_path, ssh, capsys, monkeypatch
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    settings = _settings(tmp_path, port)
    code, answer = control_api.transaction(_host(), settings, "stop", [], stream=True)
    assert (code, answer["via"]) == (0, "ssh")
    assert ssh.calls == [("run", ("cat", settings.api_key.file)), ("transaction", "stop", ())]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(control_api.VIA_ENV, "api")  # the API or nothing: exit 5, saying why
    code, answer = control_api.transaction(_host(), settings, "stop", [], stream=True)
    assert code == 5 and "did not answer" in answer["error"] and "=api" in answer["error"]
    assert ssh.calls[-1] == ("transaction", "stop", ())  # no second SSH transaction


@pytest.mark.parametrize(
    "setting",
    ["via-ssh", "control-off", "jump-host"],
)
def test_where_the_api_is_not_for_this_host_ssh_is_used_untried(
    tmp_path, ssh, monkeypatch, setting
) -> None:
    settings = _settings(tmp_path, 1)
    host = _host()
    if setting == "via-ssh":
        monkeypatch.setenv(control_api.VIA_ENV, "ssh")
    elif setting == "control-off":
        settings = replace(settings, control=replace(settings.control, enabled=False))
    else:
        host = _host(ssh_args=("-o", "ProxyJump=bastion.lan"))
    assert control_api.transaction(host, settings, "switch", ["beta"], stream=False)[0] == 0
    assert ssh.calls == [("transaction", "switch", ("beta",))]


def test_an_unknown_model_is_the_hosts_refusal_exit_2(tmp_path, ssh) -> None:
    app, fake, _ = control_app(tmp_path, key=None)
    with Server(app) as server:
        settings = _settings(tmp_path, server.port, policy="none")
        code, answer = control_api.transaction(_host(), settings, "switch", ["nope"], stream=False)
    assert code == 2 and answer["error"].startswith("no model named")
    assert fake.calls == [] and ssh.calls == []


def test_a_failed_transaction_keeps_its_exit_code(tmp_path, ssh) -> None:
    failed = {"ok": False, "code": 1, "error": "beta did not become healthy; rolled back"}
    app, fake, _ = control_app(tmp_path, fake=FakeHelper(fail=failed), key=None)
    with Server(app) as server:
        settings = _settings(tmp_path, server.port, policy="none")
        code, answer = control_api.transaction(_host(), settings, "switch", ["beta"], stream=False)
    assert (code, answer["error"]) == (1, failed["error"])
    assert ssh.calls == [] and fake.calls[0][0] == "switch"


class Breaking(FakeHelper):
    """A transaction whose stream breaks after its first progress line (the control service
    died mid-way; the transaction goes on in its own unit)."""

    async def events(self, op, **fields):
        self.calls.append((op, fields))
        yield {"event": "progress", "message": "stopping alpha"}
        await asyncio.sleep(0.05)
        raise ConnectionResetError("the control service went away")


class HelperLost(FakeHelper):
    """The root helper went away after the transaction's first step (a provision restarted it;
    the transaction goes on in its own unit): the control service says it did not answer."""

    async def events(self, op, **fields):
        self.calls.append((op, fields))
        yield {"event": "progress", "message": "stopping alpha"}
        lost = control._unreachable(Path("/run/llamavm-switchd.sock"), EOFError("no outcome"))
        yield {"event": "outcome", **lost}


@pytest.mark.parametrize("fake", [Breaking, HelperLost], ids=["stream-broken", "helper-lost"])
def test_a_switch_cut_mid_way_asks_over_ssh_how_that_transaction_ended(
    tmp_path, ssh, capsys, fake
) -> None:
    app, fake, _ = control_app(tmp_path, fake=fake(), key=None)
    with Server(app) as server:
        settings = _settings(tmp_path, server.port, policy="none")
        code, answer = control_api.transaction(_host(), settings, "switch", ["beta"], stream=True)
    tx = fake.calls[0][1]["tx"]
    # the host's own outcome (not "did not answer"), and no second transaction
    assert (code, answer["tx"], answer["reconnected"]) == (0, tx, True)
    assert ssh.calls == [("outcome", tx)]
    err = capsys.readouterr().err
    assert "stopping alpha" in err
    assert f"asking the host how transaction {tx} ended" in err


def test_a_helper_that_cannot_be_reached_is_ssh_as_nothing_started(tmp_path, ssh) -> None:
    unreachable = control._unreachable(tmp_path / "no.sock", FileNotFoundError("no socket"))
    app, _, _ = control_app(tmp_path, fake=FakeHelper(fail=unreachable), key=None)
    with Server(app) as server:
        settings = _settings(tmp_path, server.port, policy="none")
        code, answer = control_api.transaction(_host(), settings, "stop", [], stream=False)
    assert (code, answer["via"]) == (0, "ssh")


def test_the_api_refuses_a_malformed_transaction_id(tmp_path) -> None:
    app, fake, _ = control_app(tmp_path)
    client = TestClient(app)
    auth = {"Authorization": f"Bearer {KEY}"}
    for tx in ("UPPER", "a b", "x" * 33, "abc"):
        got = client.post("/stop", params={"tx": tx}, headers=auth)
        assert got.status_code == 422, tx
    assert fake.calls == []
    got = client.post(
        "/switch", params={"tx": "abcdef123456"}, json={"model": "beta"}, headers=auth
    )
    assert got.status_code == 200 and fake.calls[-1][1]["tx"] == "abcdef123456"


class Running(FakeHelper):
    async def events(self, op, **fields):
        self.calls.append((op, fields))
        yield {"event": "outcome", "ok": False, "code": 6, "tx": fields.get("tx")}


def test_transactions_endpoint_reads_the_helpers_result(tmp_path) -> None:
    app, fake, _ = control_app(tmp_path, fake=Running())
    client = TestClient(app)
    got = client.get("/transactions/abcdef123456", headers={"Authorization": f"Bearer {KEY}"})
    assert fake.calls == [("result", {"tx": "abcdef123456"})]
    assert (got.status_code, got.json()["code"]) == (202, 6)  # it still runs
    assert client.get("/transactions/abcdef123456").status_code == 401
    assert (
        client.get("/transactions/BAD", headers={"Authorization": f"Bearer {KEY}"}).status_code
        == 422
    )
