"""The switch transaction (llamavm.host.transaction) against a fake systemd and a fake clock:
every failure after the stop rolls back; crash loops fail fast; slow loads that progress are
never rolled back; stalls are; apply restarts only for a [Service] change."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llamavm.host import (
    EXIT_FAILED,
    EXIT_LOCK,
    EXIT_REFUSED,
    EXIT_ROLLBACK_FAILED,
    checks,
    store,
)
from llamavm.host.contract import HostError
from llamavm.host.runtime import SystemdRuntime, stopping_marker
from llamavm.host.transaction import Deferred, Host, Interrupted, Transaction
from llamavm.host.units import service_section
from llamavm.host.watch import LoadWatch, Sample, expected_seconds
from tests.unit.fakes.engine import FakeEngine, compose_contract
from tests.unit.fakes.host import (
    FakeSystemd,
    contracts,
    fake_systemd,
    host_on,
    lock_held,
    switch_tx,
    warm_checks,
)


@pytest.fixture(params=["systemd", "compose"])
def world(request, tmp_path, monkeypatch):
    """Two models, 'one' serving; preflight and verify pass unless a test says otherwise. Every
    test runs on both sides of the runtime seam: systemd units, and the containers of a Compose
    project (the same fake units seen through the engine's API) — one transaction for both."""
    warm_checks(monkeypatch)
    contract = contracts(tmp_path, {"one": tmp_path / "one.gguf", "two": tmp_path / "two.gguf"})
    fake = fake_systemd(contract, serving=["one"])
    lines: list[str] = []
    if request.param == "compose":
        contract = compose_contract(contract)
        engine = FakeEngine(fake)
        host = host_on(contract, fake, lines.append, engine=lambda socket: engine)
    else:
        host = host_on(contract, fake, lines.append)
    return contract, fake, host, lines


def _state(contract) -> dict:
    return store.load_state(contract.paths.state)


def _seed_state(contract, **fields) -> None:
    """Write a state file with `fields` over an empty one."""
    state = store.empty_state()
    state.update(fields)
    store.write_json(contract.paths.state, state)


def test_switch_serves_the_new_model_and_records_it(world) -> None:
    contract, fake, host, _ = world
    result = switch_tx(host).switch("two")
    assert result["changed"] and result["model"] == "two" and result["previous"] == "one"
    assert fake.running_units() == ["llamavm-model-two.service"]
    state = _state(contract)
    assert state["desired"] == "two" and state["pending"] is None
    assert state["loads"]["two"] == [pytest.approx(result["load_seconds"], abs=0.01)]


def test_switching_to_the_serving_model_changes_nothing(world) -> None:
    _, fake, host, _ = world
    assert switch_tx(host).switch("one")["changed"] is False
    assert not [c for c in fake.calls if c[0] in ("stop", "start")]


def test_a_refusal_stops_nothing(world, monkeypatch) -> None:
    _, fake, host, _ = world

    def refuse(*_a, **_k):
        raise HostError("two: GGUF missing", EXIT_REFUSED)

    monkeypatch.setattr(checks, "preflight", refuse)
    with pytest.raises(HostError) as caught:
        switch_tx(host).switch("two")
    assert caught.value.code == EXIT_REFUSED
    assert not [c for c in fake.calls if c[0] in ("stop", "start")]
    assert fake.running_units() == ["llamavm-model-one.service"]


def test_a_crash_loop_is_rolled_back_in_seconds_not_at_the_timeout(world) -> None:
    contract, fake, host, _ = world
    fake.units["llamavm-model-two.service"].behaviour = "crash"
    began = fake.now
    with pytest.raises(HostError) as caught:
        switch_tx(host).switch("two")
    assert caught.value.code == EXIT_FAILED
    assert "the server exited while loading" in str(caught.value)
    assert "one is serving again" in str(caught.value)
    assert fake.now - began < 5, "waited for the health timeout instead of failing fast"
    assert fake.running_units() == ["llamavm-model-one.service"]
    assert _state(contract)["desired"] == "one"


@dataclass
class OnRuntime(Host):
    """A Host whose runtime is the test's (`seam`)."""

    seam: Any = None

    @property
    def runtime(self) -> Any:
        return self.seam


class HostState:
    """systemd, of which only what is the host's may be asked: whether it is shutting down
    (anything else is noted in `around`: raised, it would only end in a rollback)."""

    def __init__(self, fake: FakeSystemd) -> None:
        self.system_state = fake.system_state
        self.around: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.around.append(name)
        raise AttributeError(name)


def test_the_transaction_reaches_the_model_servers_only_through_the_runtime(world) -> None:
    """start, stop, is-active and logs of one model's unit: a switch and its rollback ask the
    runtime (runtime.py) and nothing else of what runs the models."""
    contract, fake, _, lines = world
    runtime, asked = SystemdRuntime(fake, fake.clock, fake.sleep, fake.counters), []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            asked.append(name)
            return getattr(runtime, name)

    systemd = HostState(fake)
    host = OnRuntime(
        contract, systemd=systemd, progress=lines.append, health=fake.health,
        counters=fake.counters, clock=fake.clock, sleep=fake.sleep, seam=Recording(),
    )  # fmt: skip
    host.verify = lambda model: None  # type: ignore[method-assign]
    assert switch_tx(host).switch("two")["model"] == "two"
    fake.units["llamavm-model-one.service"].behaviour = "crash"
    with pytest.raises(HostError, match=r"the server exited .* two is serving again"):
        switch_tx(host).switch("one")
    assert fake.running_units() == ["llamavm-model-two.service"]
    assert {"states", "look", "start", "stop", "reset", "logs"} <= set(asked)
    assert systemd.around == []


def test_restarts_seen_between_samples_are_a_crash_loop() -> None:
    watch = LoadWatch(expected_s=20, ceiling_s=600, initial_invocation="x", initial_restarts=0)
    verdict, why = watch.judge(Sample(1.0, False, "activating", "start", "y", 5, 3))
    assert verdict == "fail" and "crash loop" in why


def test_a_new_pid_while_loading_is_a_crash() -> None:
    watch = LoadWatch(expected_s=20, ceiling_s=600, initial_invocation="x")
    assert watch.judge(Sample(0.3, False, "activating", "start", "y", 5, 0))[0] == "wait"
    verdict, why = watch.judge(Sample(0.6, False, "activating", "start", "y", 6, 0))
    assert verdict == "fail" and "new PID" in why


def test_expected_load_time_is_learned_within_bounds() -> None:
    assert expected_seconds([], 600) == 600  # no history: the catalog's ceiling
    assert expected_seconds([0.3, 0.5], 600) == 20  # the floor
    assert expected_seconds([40, 60], 600) == 180
    assert expected_seconds([400], 600) == 600


def test_a_failure_while_stopping_rolls_back(world) -> None:
    _, fake, host, _ = world
    real_stop = fake.stop
    calls = []

    def stop(units):
        calls.append(units)
        real_stop(units)
        if len(calls) == 1:
            raise OSError("systemctl: connection timed out")

    fake.stop = stop  # type: ignore[method-assign]
    with pytest.raises(HostError, match="one is serving again"):
        switch_tx(host).switch("two")
    assert fake.running_units() == ["llamavm-model-one.service"]


def test_a_slow_load_that_progresses_is_never_rolled_back(world) -> None:
    contract, fake, host, _ = world
    _seed_state(contract, loads={"two": [0.5]})  # a warm load took 0.5 s: expect 20 s at most
    fake.units["llamavm-model-two.service"].behaviour = "slow"
    fake.units["llamavm-model-two.service"].load_s = 45  # a cold load from a network share
    result = switch_tx(host).switch("two")
    assert result["model"] == "two" and result["load_seconds"] >= 45
    assert fake.running_units() == ["llamavm-model-two.service"]


def _count_shows(fake: FakeSystemd, unit: str) -> list[float]:
    """When systemd was asked about `unit` (fake clock), from now on."""
    asked: list[float] = []
    real_show = fake.show

    def show(units, props):
        if unit in units:
            asked.append(fake.now)
        return real_show(units, props)

    fake.show = show  # type: ignore[method-assign]
    return asked


def test_a_long_load_is_watched_in_proc_and_systemctl_is_seldom_forked(world) -> None:
    # Every systemctl is a fork and an exec; on a small VM they took seconds of CPU from the
    # very load the transaction waited for.
    contract, fake, host, _ = world
    _seed_state(contract, loads={"two": [30]})
    unit = fake.units["llamavm-model-two.service"]
    unit.behaviour, unit.load_s = "slow", 45
    asked = _count_shows(fake, "llamavm-model-two.service")
    result = switch_tx(host).switch("two")
    assert result["load_seconds"] >= 45
    assert len(asked) <= 15, f"systemd asked {len(asked)} times during a 45 s load"


def test_a_server_that_dies_late_in_a_long_load_is_seen_at_once(world) -> None:
    contract, fake, host, _ = world
    _seed_state(contract, loads={"two": [30]})
    unit = fake.units["llamavm-model-two.service"]
    unit.behaviour, unit.load_s = "slow", 45
    real_sleep, died_at = fake.sleep, []

    def sleep(seconds):
        real_sleep(seconds)
        if unit.active == "activating" and fake.now - unit.started_at > 30 and not died_at:
            died_at.append(fake.now)
            unit.active, unit.sub, unit.pid = "failed", "failed", 0  # it exited

    fake.sleep = sleep  # type: ignore[method-assign]
    host.sleep = sleep
    restarted = []
    real_start = fake.start

    def start(name):
        if name == "llamavm-model-one.service":
            restarted.append(fake.now)
        return real_start(name)

    fake.start = start  # type: ignore[method-assign]
    with pytest.raises(HostError, match="the server exited while loading"):
        switch_tx(host).switch("two")
    # The rollback starts 'one' again within a health poll (250 ms), not a systemd tick later.
    assert restarted and restarted[0] - died_at[0] < 0.5, (died_at, restarted)


def test_a_stalled_load_is_rolled_back_before_the_ceiling(world) -> None:
    contract, fake, host, _ = world
    _seed_state(contract, loads={"two": [0.5]})
    fake.units["llamavm-model-two.service"].behaviour = "stall"
    began = fake.now
    with pytest.raises(HostError, match="stalled: no progress") as caught:
        switch_tx(host).switch("two")
    assert caught.value.code == EXIT_FAILED
    assert 20 < fake.now - began < 60
    assert fake.running_units() == ["llamavm-model-one.service"]


def test_the_catalog_timeout_is_the_hard_ceiling(world) -> None:
    _, fake, host, _ = world
    fake.units["llamavm-model-two.service"].behaviour = "slow"
    fake.units["llamavm-model-two.service"].load_s = 61  # health_timeout_s is 60
    with pytest.raises(HostError, match="not healthy after 60s"):
        switch_tx(host).switch("two")
    assert fake.running_units() == ["llamavm-model-one.service"]


@pytest.mark.parametrize(
    "failure",
    [ConnectionResetError("reset by peer"), TimeoutError("timed out"), KeyError("n_ctx")],
    ids=["reset", "timeout", "bug"],
)
def test_any_exception_in_the_checks_rolls_back(world, failure) -> None:
    contract, fake, host, _ = world

    def verify(model):
        raise failure

    host.verify = verify  # type: ignore[method-assign]
    with pytest.raises(HostError) as caught:
        switch_tx(host).switch("two")
    assert caught.value.code == EXIT_FAILED
    assert type(failure).__name__ in str(caught.value)
    assert fake.running_units() == ["llamavm-model-one.service"]
    assert _state(contract)["pending"] is None


def test_a_signal_after_the_stop_rolls_back(world) -> None:
    _, fake, host, _ = world

    def interrupted(model):
        raise Interrupted("SIGTERM")

    host.verify = interrupted  # type: ignore[method-assign]
    with pytest.raises(HostError, match="interrupted by SIGTERM") as caught:
        switch_tx(host).switch("two")
    assert caught.value.code == EXIT_FAILED
    assert fake.running_units() == ["llamavm-model-one.service"]


def test_when_the_rollback_fails_too_it_says_so(world) -> None:
    _, fake, host, _ = world
    fake.units["llamavm-model-two.service"].behaviour = "exits"
    fake.units["llamavm-model-one.service"].behaviour = "exits"
    with pytest.raises(HostError, match="rollback to one failed too") as caught:
        switch_tx(host).switch("two")
    assert caught.value.code == EXIT_ROLLBACK_FAILED


def test_with_nothing_serving_before_a_failure_falls_back_to_the_default(world) -> None:
    _contract, fake, host, _ = world
    fake.stop(["llamavm-model-one.service"])
    fake.units["llamavm-model-two.service"].behaviour = "exits"
    with pytest.raises(HostError, match="the default model one serves"):
        switch_tx(host).switch("two")
    assert fake.running_units() == ["llamavm-model-one.service"]


def test_recover_finishes_a_switch_whose_process_died(world) -> None:
    contract, fake, host, _ = world
    _seed_state(
        contract, pending={"tx": "dead01", "op": "switch", "target": "two", "previous": "one"}
    )
    fake.stop(["llamavm-model-one.service"])  # it died after the stop
    result = Transaction(host, "rec", "recover").recover("killed")
    assert result["recovered"] == "dead01"
    assert fake.running_units() == ["llamavm-model-one.service"]
    outcome = store.read_outcome(contract.paths.outcomes, "dead01")
    assert outcome["code"] == EXIT_FAILED and "rolled back" in outcome["error"]
    assert _state(contract)["pending"] is None


def test_recover_keeps_a_switch_that_had_finished_serving(world) -> None:
    contract, fake, host, _ = world
    _seed_state(
        contract, pending={"tx": "dead02", "op": "switch", "target": "two", "previous": "one"}
    )
    fake.stop(["llamavm-model-one.service"])
    fake.serve(contract, "two")
    Transaction(host, "rec", "recover").recover("killed")
    assert fake.running_units() == ["llamavm-model-two.service"]
    assert store.read_outcome(contract.paths.outcomes, "dead02")["code"] == 0
    assert _state(contract)["desired"] == "two"


def test_stop_records_the_operators_choice_and_boot_respects_it(world) -> None:
    _contract, fake, host, _ = world
    assert Transaction(host, "s1", "stop").stop()["stopped"] == ["one"]
    assert fake.running_units() == []
    assert Transaction(host, "b1", "boot").boot()["why"] == "stopped by the operator"
    assert fake.running_units() == []


def test_boot_brings_back_the_model_chosen_last(world) -> None:
    _contract, fake, host, _ = world
    switch_tx(host).switch("two")
    fake.stop(["llamavm-model-two.service"])  # the reboot
    assert Transaction(host, "b2", "boot").boot()["model"] == "two"
    assert fake.running_units() == ["llamavm-model-two.service"]


# --- apply: staged units -------------------------------------------------------------------------

UNIT = """# managed
[Unit]
Description=m
{unit_extra}
[Service]
ExecStart=/bin/server {arg}
Restart=on-failure
"""


def _stage(contract, name: str, *, unit_extra: str = "", arg: str = "a", live: bool = False):
    text = UNIT.format(unit_extra=unit_extra, arg=arg)
    folder = contract.paths.units_live if live else contract.paths.units_staged
    (folder / f"llamavm-model-{name}.service").write_text(text)
    return text


def test_apply_installs_a_dependency_change_without_restarting(world) -> None:
    contract, fake, host, _ = world
    for name in ("one", "two"):
        _stage(contract, name, live=True)
        _stage(contract, name, unit_extra="Conflicts=llamavm-model-three.service")
    report = Transaction(host, "ap1", "apply").apply()
    assert sorted(report["installed"]) == ["llamavm-model-one.service", "llamavm-model-two.service"]
    assert report["restarted"] == [] and fake.reloads == 1
    assert not [c for c in fake.calls if c[0] in ("stop", "start")], "the serving model restarted"
    live = (contract.paths.units_live / "llamavm-model-one.service").read_text()
    assert "llamavm-model-three" in live


def test_apply_restarts_the_serving_model_through_the_transaction(world) -> None:
    contract, fake, host, _ = world
    for name in ("one", "two"):
        _stage(contract, name, live=True)
        _stage(contract, name, arg="b")
    report = Transaction(host, "ap2", "apply").apply()
    assert report["restarted"] == ["llamavm-model-one.service"]
    assert fake.running_units() == ["llamavm-model-one.service"]
    assert "/bin/server b" in (contract.paths.units_live / "llamavm-model-one.service").read_text()


def test_apply_fetches_the_new_units_bytes_before_it_stops_the_model(world) -> None:
    """A unit that now reads a staged copy: the copy is made while the old unit serves."""
    contract, fake, host, _ = world
    for name in ("one", "two"):
        _stage(contract, name, live=True)
        _stage(contract, name, arg="b")
    order: list[str] = []
    stop = fake.stop
    host.fetch = lambda model, source, keep: order.append(f"fetch {model.name}") or {}
    fake.stop = lambda units: order.append("stop") or stop(units)  # type: ignore[method-assign]
    Transaction(host, "ap4", "apply").apply()
    assert order[:2] == ["fetch one", "stop"]


def test_apply_rolls_back_to_the_old_unit_when_the_new_one_fails(world) -> None:
    contract, fake, host, _ = world
    old = _stage(contract, "one", live=True)
    _stage(contract, "two", live=True)
    _stage(contract, "one", arg="broken")
    _stage(contract, "two")
    unit = fake.units["llamavm-model-one.service"]
    reloads: list[str] = []

    def reload() -> None:  # the fake server fails with the new unit only
        text = (contract.paths.units_live / "llamavm-model-one.service").read_text()
        unit.behaviour = "exits" if "broken" in text else "ok"
        reloads.append(text)

    fake.daemon_reload = reload  # type: ignore[method-assign]
    with pytest.raises(HostError, match="one is serving again") as caught:
        Transaction(host, "ap3", "apply").apply()
    assert caught.value.code == EXIT_FAILED
    assert (contract.paths.units_live / "llamavm-model-one.service").read_text() == old
    assert fake.running_units() == ["llamavm-model-one.service"]


def test_apply_removes_units_of_dropped_models_and_starts_one_if_none_serves(world) -> None:
    contract, fake, host, _ = world
    for name in ("one", "two"):
        _stage(contract, name, live=True)
        _stage(contract, name)
    gone = contract.paths.units_live / "llamavm-model-old.service"
    gone.write_text(UNIT.format(unit_extra="", arg="x"))
    fake.stop(["llamavm-model-one.service"])
    fake.enabled_units.add("llamavm-model-one.service")
    report = Transaction(host, "ap4", "apply").apply()
    assert report["removed"] == ["llamavm-model-old.service"] and not gone.exists()
    assert report["started"] == "one"
    assert report["disabled"] == ["llamavm-model-one.service"]


def test_a_second_apply_changes_nothing(world) -> None:
    contract, _fake, host, _ = world
    for name in ("one", "two"):
        _stage(contract, name, live=True)
        _stage(contract, name)
    assert Transaction(host, "ap5", "apply").apply()["changed"] is False


def test_drift_says_what_apply_would_do_and_changes_nothing(world) -> None:
    contract, fake, host, _ = world
    for name in ("one", "two"):
        _stage(contract, name, live=True)
        _stage(contract, name)
    tx = Transaction(host, "dr1", "drift")
    assert tx.drift() == []
    live = contract.paths.units_live / "llamavm-model-two.service"
    live.write_text(live.read_text() + "# edited by hand\n")
    (contract.paths.units_live / "llamavm-model-old.service").write_text("x")
    fake.enabled_units.add("llamavm-model-one.service")
    calls = len(fake.calls)
    drift = tx.drift()
    assert drift == [
        f"{live}: differs from the staged unit",
        f"{contract.paths.units_live}/llamavm-model-old.service: its model is no longer in the "
        "catalog",
        "llamavm-model-one.service: enabled (only the boot unit starts models)",
    ]
    assert not [c for c in fake.calls[calls:] if c[0] in ("stop", "start", "disable")]
    assert "# edited by hand" in live.read_text()
    fake.stop(["llamavm-model-one.service"])
    assert "no model serves (provision starts the chosen one)" in tx.drift()
    (contract.paths.units_staged / "llamavm-model-two.service").unlink()
    with pytest.raises(HostError, match="missing — run 'invoke provision'"):
        tx.drift()


def test_service_section_ignores_comments_and_folds_continuations() -> None:
    a = "[Unit]\nX=1\n[Service]\n# why\nExecStart=/a \\\n    --b\nUser=x\n"
    b = "[Unit]\nX=2\n[Service]\nExecStart=/a --b\n\nUser=x\n"
    assert service_section(a) == service_section(b) == ["ExecStart=/a --b", "User=x"]


# --- the store ------------------------------------------------------------------------------------


def test_the_lock_is_root_only_and_times_out(tmp_path) -> None:
    lock = tmp_path / "lock" / "switch.lock"
    with lock_held(lock), pytest.raises(HostError) as caught, store.locked(lock, 0.2):
        pass
    assert caught.value.code == EXIT_LOCK
    assert stat.S_IMODE(os.stat(lock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(lock.parent).st_mode) == 0o700


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"loads": "x", "desired": 5}', ""])
def test_a_malformed_state_file_is_set_aside(tmp_path, content, capsys) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    state = store.load_state(path)
    assert state["desired"] is None and state["loads"] == {}
    if content in ("{not json", "[1, 2]", ""):
        assert list(tmp_path.glob("state.json.corrupt-*"))


def test_state_writes_are_atomic_and_leave_no_temp_files(tmp_path) -> None:
    path = tmp_path / "state.json"
    for i in range(5):
        store.write_json(path, {"n": i})
    assert json.loads(path.read_text()) == {"n": 4}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.skipif(os.geteuid() != 0, reason="failpoints are honoured only in root-owned files")
def test_failpoints_are_read_only_from_a_private_root_file(tmp_path) -> None:
    path = tmp_path / "failpoints.json"
    path.write_text('{"in_verify": {"raise": "x"}}')
    path.chmod(0o644)
    store.Failpoints(path)("in_verify")  # world-readable: ignored
    path.chmod(0o600)
    with pytest.raises(ConnectionResetError):
        store.Failpoints(path)("in_verify")


def test_outcomes_are_kept_and_pruned(tmp_path) -> None:
    for i in range(store.KEEP_OUTCOMES + 5):
        store.save_outcome(tmp_path, f"tx{i:04d}", {"code": 0})
    assert len(list(tmp_path.glob("*.json"))) == store.KEEP_OUTCOMES
    assert store.read_outcome(tmp_path, f"tx{store.KEEP_OUTCOMES + 4:04d}") == {"code": 0}
    assert store.read_outcome(tmp_path, "nope") is None


def test_progress_never_fails(tmp_path) -> None:
    progress = store.Progress(Path("/proc/forbidden-dir"), "t1")
    progress("a line that has nowhere to go")


def test_a_failure_during_shutdown_is_left_to_the_boot(world) -> None:
    contract, fake, host, _ = world

    def interrupted(model):
        fake.state = "stopping"  # systemd is powering off and sends SIGTERM
        # (on Compose: llamavm-switchd's container is told to stop, and says so)
        stopping_marker(contract).parent.mkdir(parents=True, exist_ok=True)
        stopping_marker(contract).touch()
        raise Interrupted("SIGTERM")

    host.verify = interrupted  # type: ignore[method-assign]
    with pytest.raises(Deferred):
        switch_tx(host).switch("two")
    pending = _state(contract)["pending"]
    assert pending and pending["target"] == "two" and pending["previous"] == "one"
    fake.state = "running"  # ... and after the boot:
    stopping_marker(contract).unlink()
    fake.stop(["llamavm-model-two.service"])
    result = Transaction(host, "boot1", "boot").boot()
    assert fake.running_units() == ["llamavm-model-one.service"]
    outcome = store.read_outcome(contract.paths.outcomes, "abc123")
    assert outcome["code"] == EXIT_FAILED and "rebooted" in outcome["recovered"]
    assert result["changed"] is False  # the recovery already serves the chosen model


def test_apply_leaves_exactly_one_model_when_several_were_started_by_hand(world) -> None:
    contract, fake, host, _ = world
    for name in ("one", "two"):
        _stage(contract, name, live=True)
        _stage(contract, name)
    _seed_state(contract, desired="two")
    fake.serve(contract, "two")  # both run now
    Transaction(host, "ap6", "apply").apply()
    assert fake.running_units() == ["llamavm-model-two.service"]
