"""llamavm-switchd and the supervised transaction (the Compose project's way, without systemd):
the supervisor recovers a transaction whose process died and leaves its PID where followers
look; a follower waits while the supervisor lives; switchd finds a pending transaction that
nothing runs any more (the lock is free) and knows when the chosen model should serve but
does not."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llamavm.host import EXIT_UNKNOWN, runner, store, switchd
from llamavm.ops import remote
from tests.unit.fakes.engine import FakeEngine, compose_contract
from tests.unit.fakes.host import contracts, fake_systemd, host_on, lock_held


@pytest.fixture
def contract(tmp_path: Path):
    plain = contracts(tmp_path, {"one": tmp_path / "one.gguf", "two": tmp_path / "two.gguf"})
    return compose_contract(plain)


def _switch_script(contract, body: str) -> None:
    """contract.paths.switch as a shell script: `run TX OP ...` does `body`."""
    script = contract.paths.switch
    script.write_text(f'#!/bin/sh\nif [ "$1" = run ]; then\n{body}\nfi\n')
    script.chmod(0o755)


def test_transactions_are_supervised_on_compose_only(contract, tmp_path: Path) -> None:
    assert runner.supervised(contract)
    assert not runner.supervised(contracts(tmp_path / "s", {"one": tmp_path / "one.gguf"}))


def test_the_supervisor_runs_the_transaction_and_leaves_no_pid(contract, monkeypatch) -> None:
    def run_tx(c, tx, op, args):
        assert (tx, op, args) == ("tx0001", "switch", ["two"])
        answer = {"ok": True, "code": 0}
        store.save_outcome(c.paths.outcomes, tx, answer, c.paths.counters)
        return answer

    called: list[str] = []
    monkeypatch.setattr(runner, "recover", lambda c, tx: called.append(tx))
    contract.paths.progress.mkdir(parents=True, exist_ok=True)
    assert runner.supervise(contract, "tx0001", "switch", ["two"], run_tx) == 0
    assert called == []  # an outcome was recorded: nothing to recover
    assert not runner.supervisor_pid_path(contract, "tx0001").exists()


def test_a_transaction_that_dies_without_an_outcome_is_recovered(contract, monkeypatch) -> None:
    def run_tx(c, tx, op, args):
        os.kill(os.getpid(), 9)  # the transaction's process killed outright

    called: list[str] = []
    monkeypatch.setattr(runner, "recover", lambda c, tx: called.append(tx))
    contract.paths.progress.mkdir(parents=True, exist_ok=True)
    assert runner.supervise(contract, "tx0002", "switch", ["two"], run_tx) == -9
    assert called == ["tx0002"]


def test_a_follower_waits_while_the_supervisor_lives(contract) -> None:
    contract.paths.progress.mkdir(parents=True, exist_ok=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        runner.supervisor_pid_path(contract, "tx0003").write_text(f"{alive.pid}\n")

        def record() -> None:
            time.sleep(1.5)
            store.save_outcome(contract.paths.outcomes, "tx0003", {"ok": True, "code": 0},
                               contract.paths.counters)  # fmt: skip

        threading.Thread(target=record).start()
        answer = runner.follow(contract, None, "tx0003", 20.0, lambda _: None)  # type: ignore[arg-type]
        assert answer["ok"] is True  # not "unknown": the supervisor lived until it ended
    finally:
        alive.kill()
        alive.wait()


def test_a_follower_of_a_dead_supervisor_learns_the_outcome_is_unknown(contract) -> None:
    contract.paths.progress.mkdir(parents=True, exist_ok=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    runner.supervisor_pid_path(contract, "tx0004").write_text(f"{gone.pid}\n")
    answer = runner.follow(contract, None, "tx0004", 30.0, lambda _: None)  # type: ignore[arg-type]
    assert answer["code"] == EXIT_UNKNOWN


def test_a_pending_transaction_is_orphaned_only_while_nothing_holds_the_lock(contract) -> None:
    assert switchd.orphaned(contract) is None
    state = store.empty_state()
    state["pending"] = {"tx": "tx0005", "op": "switch", "target": "two", "previous": "one"}
    store.write_json(contract.paths.state, state)
    assert switchd.orphaned(contract) == "tx0005"
    with lock_held(contract.paths.lock):
        assert switchd.orphaned(contract) is None  # a live transaction holds the lock


def test_unserved_when_nothing_runs_that_the_operator_did_not_stop(contract) -> None:
    fake = fake_systemd(contract, serving=["one"])
    engine = FakeEngine(fake)
    host = host_on(contract, fake, lambda _: None, engine=lambda socket: engine)
    assert not switchd.unserved(contract, host)
    fake.stop(["llamavm-model-one.service"])  # its container was killed by hand
    assert switchd.unserved(contract, host)
    state = store.empty_state()
    state["stopped"] = True
    store.write_json(contract.paths.state, state)
    assert not switchd.unserved(contract, host)  # invoke stop: nothing should serve


def test_a_host_reached_through_the_switchd_container() -> None:
    host = remote.Host("compose", "10.0.0.1", None, None, None, (),
                       via=("docker", "exec", "-i", "llamavm-switchd"))  # fmt: skip
    assert host.ssh_command(["sudo", "-n", "/usr/local/bin/llamavm-switch", "status"]) == [
        "docker", "exec", "-i", "llamavm-switchd", "/usr/local/bin/llamavm-switch", "status"
    ]  # fmt: skip
    gone = subprocess.CompletedProcess([], 1, "", "Error: No such container: llamavm-switchd")
    assert remote._transport(host, gone).returncode == 255  # as a broken SSH session
    refused = subprocess.CompletedProcess([], 2, '{"ok": false}', "")
    assert remote._transport(host, refused).returncode == 2
    assert "switchd container did not answer" in str(remote._ssh_failed(host, gone))


def test_switchd_leaves_its_stopping_mark_for_the_transaction(contract) -> None:
    from llamavm.host.runtime import ComposeRuntime, stopping_marker

    runtime = ComposeRuntime(None, "x", stopping=stopping_marker(contract))  # type: ignore[arg-type]
    assert not runtime.shutting_down()
    stopping_marker(contract).parent.mkdir(parents=True, exist_ok=True)
    stopping_marker(contract).touch()
    assert runtime.shutting_down()
    assert os.path.basename(switchd.helper_socket(contract)) == "switchd.sock"


def test_the_load_watch_never_waits_for_the_engines_stats(contract) -> None:
    """One look at a container's stats makes the engine wait for its next sample (up to a
    second): with the real engine they are read in a thread and the watch takes the latest."""
    from llamavm.host.runtime import ComposeRuntime

    class SlowStats:
        def usage(self, name: str) -> tuple[int, ...]:
            time.sleep(0.3)
            return (7, 0)

    runtime = ComposeRuntime(SlowStats(), "x", background=True)  # type: ignore[arg-type]
    model = contract.models[0]
    began = time.monotonic()
    assert runtime.counters(model, 42) is None  # nothing read yet, and no wait for it
    assert time.monotonic() - began < 0.1
    deadline = time.monotonic() + 5
    while runtime.counters(model, 42) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime.counters(model, 42) == (7, 0)
    assert runtime.counters(model, 0) is None  # no server: nothing to read
