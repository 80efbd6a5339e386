"""The control service's root helper as a daemon (llamavm/host/helper.py): one process answers
every connection on the socket systemd passes it, each in a thread, until the host package it
runs from is replaced. Requests that need systemd run on the test bed
(tests/integration/test_control.py); here, those answered before any unit starts."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from llamavm.host import helper, protocol
from llamavm.host.contract import HostError
from tests.unit.fakes.control import control_contract


def _ask(path: Path, line: bytes, timeout: float = 10.0) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(timeout)
        conn.connect(str(path))
        conn.sendall(line)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return [json.loads(raw) for raw in data.splitlines()]


@pytest.fixture
def running(tmp_path):
    """A daemon on a unix socket in tmp_path: (socket path, package path, stop event, thread)."""
    host = control_contract(tmp_path)
    path = tmp_path / "switchd.sock"
    package = tmp_path / "llamavm-switch.pyz"
    package.write_bytes(b"v1")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(64)
    stop = threading.Event()
    result: list[int] = []
    loads: list[int] = []

    def load():
        loads.append(1)
        if (tmp_path / "broken").exists():
            raise HostError("/etc/llamavm/contract.json is unreadable — run 'invoke provision'", 2)
        return host

    thread = threading.Thread(
        target=lambda: result.append(helper.daemon(load, listener, package, stop)), daemon=True
    )
    thread.start()
    yield path, package, stop, thread, result, loads
    stop.set()
    thread.join(5)
    listener.close()


def test_one_daemon_answers_many_connections_and_reads_the_contract_for_each(running) -> None:
    path, _package, _stop, thread, _result, loads = running
    answers = []

    def one(i: int) -> None:
        answers.append(_ask(path, protocol.request_line("switch", model=f"nope{i}")))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(answers) == 8
    for events in answers:
        assert [e["event"] for e in events] == ["outcome"]
        assert events[0]["code"] == 2 and events[0]["error"].startswith("no model named 'nope")
    assert len(loads) == 8  # a contract rewritten by a provision is seen at the next request
    assert thread.is_alive()


def test_a_malformed_request_and_an_unreadable_contract_get_one_outcome_each(running) -> None:
    path, *_rest = running
    (outcome,) = _ask(path, b'{"op": "reboot"}\n')
    assert outcome["code"] == 2 and "needs an op" in outcome["error"]
    (outcome,) = _ask(path, b"x" * (protocol.MAX_REQUEST + 10) + b"\n")
    assert outcome["code"] == 2 and "one JSON line" in outcome["error"]
    (path.parent / "broken").touch()
    (outcome,) = _ask(path, protocol.request_line("status"))
    assert outcome["ok"] is False and "invoke provision" in outcome["error"]


def test_a_silent_connection_times_out_without_holding_up_the_others(running, monkeypatch):
    monkeypatch.setattr(helper, "REQUEST_TIMEOUT_S", 3.0)
    path, *_rest = running
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(str(path))
    try:
        (outcome,) = _ask(path, protocol.request_line("check", model="nope"))
        assert outcome["code"] == 2
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):  # answered the other while this one still waits
            silent.recv(65536)
        silent.settimeout(10)
        (late,) = [json.loads(raw) for raw in silent.recv(65536).splitlines()]
        assert late["code"] == 2 and "no request line" in late["error"]
    finally:
        silent.close()


def test_more_connections_than_it_answers_at_once_are_refused_with_a_retry(running, monkeypatch):
    monkeypatch.setattr(helper, "MAX_CONNECTIONS", 1)
    monkeypatch.setattr(helper, "REQUEST_TIMEOUT_S", 3.0)
    path, *_rest = running
    with socket.socket(socket.AF_UNIX) as holder:
        holder.connect(str(path))
        time.sleep(0.3)  # the daemon took it: its one slot is in use
        (outcome,) = _ask(path, protocol.request_line("status"))
    assert outcome["code"] == 2 and "retry" in outcome["error"]


def test_it_exits_once_its_package_is_replaced_and_nothing_is_in_flight(running) -> None:
    path, package, _stop, thread, result, _loads = running
    (outcome,) = _ask(path, protocol.request_line("switch", model="nope"))
    assert outcome["code"] == 2 and thread.is_alive()
    fresh = package.with_suffix(".new")
    fresh.write_bytes(b"v2")
    fresh.replace(package)  # as Ansible's copy replaces it
    thread.join(5)
    assert not thread.is_alive() and result == [0]


def test_without_socket_activation_serve_answers_stdin(monkeypatch) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert helper.listen_fd() is None
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", "1")  # another process's
    assert helper.listen_fd() is None
    import os

    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    assert helper.listen_fd() == helper.LISTEN_FDS_START
