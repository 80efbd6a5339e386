"""The firewall in the switch transaction, the nvidia-smi parser and the metrics sampler.

The firewall seam is faked here (a dict standing in for the nftables set); the real nft runs in
tests/integration/test_expose.py. nvidia-smi answers come from tests/fixtures/nvidia-smi.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamavm.host import EXIT_FAILED, EXIT_REFUSED, firewall, gpu, metrics, store
from llamavm.host.contract import Firewall, HostError, Metrics
from llamavm.host.transaction import Transaction
from tests.unit.fakes.host import contracts, fake_systemd, host_on, switch_tx, warm_checks
from tests.unit.fakes.nft import FakeNft

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "nvidia-smi"
FW = Firewall(
    unit="llamavm-firewall.service",
    table="llamavm",
    set="model_ports",
    front_door_map="front_door",
    front_door_port=8400,
)


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Models 'one' (8001, serving, its port open) and 'two' (8002); the firewall unit active."""
    warm_checks(monkeypatch)
    contract = contracts(
        tmp_path, {"one": tmp_path / "one.gguf", "two": tmp_path / "two.gguf"}, firewall=FW
    )
    fake = fake_systemd(contract, serving=["one"], active=[FW.unit])
    nft = FakeNft([8001])
    events: list[str] = []
    host = host_on(
        contract,
        fake,
        events.append,
        open_ports=nft.set_open,
        firewall_state=nft.state,
        front_door_hold=nft.hold,
    )

    def verify(model):
        events.append(f"verify {model.name} (open {nft.ports})")

    host.verify = verify  # type: ignore[method-assign]
    return SimpleNamespace(contract=contract, fake=fake, nft=nft, host=host, events=events)


def test_a_switch_opens_the_new_port_only_after_the_new_model_is_verified(world) -> None:
    result = switch_tx(world.host).switch("two")
    assert result["model"] == "two"
    assert world.nft.ports == [8002]
    # while it was verified (from the host itself) the LAN still saw the old rule set
    assert "verify two (open [8001])" in world.events
    assert world.events.index("verify two (open [8001])") < world.events.index(
        "firewall: port 8002 (two) open, other model ports closed"
    )


def test_a_failed_switch_leaves_the_old_rule_set(world) -> None:
    def refuse(model):
        raise HostError(f"{model.name}: /props answered 500")

    world.host.verify = refuse  # type: ignore[method-assign]
    with pytest.raises(HostError) as failure:
        switch_tx(world.host).switch("two")
    assert failure.value.code == EXIT_FAILED
    assert "one is serving again" in str(failure.value)
    assert world.nft.ports == [8001] and world.nft.front == 8001
    assert world.nft.log == ["hold", "open [8001]"]  # the front door led back to one


def test_a_firewall_update_that_fails_rolls_the_switch_back(world) -> None:
    world.nft.fail_updates = True
    with pytest.raises(HostError) as failure:
        switch_tx(world.host).switch("two")
    assert failure.value.code == EXIT_FAILED
    assert "nft refused the update" in str(failure.value)
    assert world.fake.running_units() == ["llamavm-model-one.service"]
    assert world.nft.ports == [8001]


def test_a_rollback_to_another_port_puts_that_port_back(world) -> None:
    # 'two' serves but the firewall still lets in 8001 (say, a hand edit): switching to 'one'
    # fails after the stop; the rollback serves 'two' again and opens 8002.
    world.fake.serve(world.contract, "two")
    world.fake.units["llamavm-model-one.service"].active = "inactive"
    world.fake.units["llamavm-model-one.service"].behaviour = "exits"
    with pytest.raises(HostError) as failure:
        switch_tx(world.host).switch("one")
    assert "two is serving again" in str(failure.value)
    assert world.nft.ports == [8002]


def test_stop_closes_every_model_port(world) -> None:
    result = Transaction(world.host, "abc124", "stop").stop()
    assert result["stopped"] == ["one"]
    assert world.nft.ports == []


def test_a_switch_to_the_serving_model_repairs_the_rule_set(world) -> None:
    world.nft.ports = []
    result = switch_tx(world.host).switch("one")
    assert result == {"changed": True, "model": "one", "previous": "one"}
    assert world.nft.ports == [8001]
    assert switch_tx(world.host).switch("one")["changed"] is False


def test_a_deleted_table_refuses_the_switch_before_anything_stops(world) -> None:
    world.nft.loaded = False
    with pytest.raises(HostError) as failure:
        switch_tx(world.host).switch("two")
    assert failure.value.code == EXIT_REFUSED
    assert world.fake.running_units() == ["llamavm-model-one.service"]
    assert not [c for c in world.fake.calls if c[0] == "stop"]


def test_with_the_firewall_unit_stopped_the_switch_leaves_nft_alone(world) -> None:
    world.fake.units[FW.unit].active = "inactive"
    world.nft.loaded = False  # would raise if touched
    assert switch_tx(world.host).switch("two")["model"] == "two"


def test_sync_opens_the_serving_model_only_when_it_is_healthy(world) -> None:
    world.nft.ports = [8002]
    assert Transaction(world.host, "abc125", "expose").sync_firewall() == {
        "changed": True,
        "open": [8001],
    }
    world.fake.units["llamavm-model-one.service"].active = "inactive"
    assert Transaction(world.host, "abc126", "expose").sync_firewall()["open"] == []
    assert world.nft.ports == []


def test_the_nft_batch_replaces_the_set_and_the_front_door_in_one_transaction() -> None:
    assert firewall.batch(FW, [8002, 8002], 8002) == (
        "flush set inet llamavm model_ports\n"
        "add element inet llamavm model_ports { 8002 }\n"
        "flush map inet llamavm front_door\n"
        "add element inet llamavm front_door { 8400 : 8002 }\n"
    )
    assert firewall.batch(FW, [], None) == (
        "flush set inet llamavm model_ports\nflush map inet llamavm front_door\n"
    )
    bare = Firewall(unit="u", table="llamavm", set="model_ports")
    assert firewall.batch(bare, [8001], 8001) == (
        "flush set inet llamavm model_ports\nadd element inet llamavm model_ports { 8001 }\n"
    )


def test_a_missing_nft_table_is_one_line_with_the_fix(monkeypatch) -> None:
    answer = subprocess.CompletedProcess(
        [], 1, "", "Error: No such file or directory\nlist set inet llamavm model_ports\n"
    )
    monkeypatch.setattr(firewall, "_nft", lambda *a, **k: answer)
    with pytest.raises(HostError) as failure:
        firewall.open_ports(FW)
    assert failure.value.code == EXIT_REFUSED
    assert "\n" not in str(failure.value)
    assert "systemctl restart llamavm-firewall.service" in str(failure.value)


def test_state_reads_nft_json_and_skips_an_unchanged_update(monkeypatch) -> None:
    listing = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "llamavm"}},
            {"set": {"family": "inet", "name": "model_ports", "table": "llamavm", "elem": [8002]}},
            {"map": {"name": "front_door", "map": "inet_service", "elem": [[8400, 8002]]}},
        ]
    }
    calls = []

    def nft(args, stdin=None):
        calls.append(args)
        return subprocess.CompletedProcess([], 0, json.dumps(listing), "")

    monkeypatch.setattr(firewall, "_nft", nft)
    assert firewall.state(FW) == ([8002], 8002)
    assert firewall.set_open(FW, [8002]) is False
    assert calls[-1][:2] == ["-j", "list"], "nothing applied when nothing changes"
    assert firewall.set_open(FW, [8001]) is True
    assert calls[-1] == ["-f", "-"]


@pytest.mark.parametrize("wake_port", [8401, None])
def test_a_hold_leaves_the_front_door_pointing_nowhere_and_the_port_open(
    monkeypatch, wake_port
) -> None:
    """Mid-switch, front-door requests wait in Caddy (it dials again until a model is exposed;
    it reads a request's body first, so it can send it again); the draining model's port
    stays open meanwhile."""
    fw = dataclasses.replace(FW, wake_port=wake_port)
    applied: list[str] = []

    def nft(args, stdin=None):
        if args[:2] == ["-j", "list"]:
            listing = {"nftables": [
                {"set": {"name": "model_ports", "elem": [8001]}},
                {"map": {"name": "front_door", "elem": [[8400, 8001]]}},
            ]}  # fmt: skip
            return subprocess.CompletedProcess([], 0, json.dumps(listing), "")
        applied.append(stdin)
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(firewall, "_nft", nft)
    assert firewall.hold(fw) is True
    assert applied == [
        "flush set inet llamavm model_ports\n"
        "add element inet llamavm model_ports { 8001 }\n"
        "flush map inet llamavm front_door\n"
    ]


class MapWithPools:
    """nft's map (the front door's target) and the pool flag, seen as one ordered story."""

    def __init__(self, monkeypatch, fw: Firewall, target: int | None) -> None:
        self.fw, self.target, self.story = fw, target, []
        monkeypatch.setattr(firewall, "_nft", self.nft)
        real = firewall.turn_pools

        def turn(fw: Firewall) -> None:
            real(fw)
            self.story.append(f"pool {'b' if Path(fw.front_door_flag).exists() else 'a'}")

        monkeypatch.setattr(firewall, "turn_pools", turn)

    def nft(self, args, stdin=None):
        if args[:2] == ["-j", "list"]:
            elem = [[8400, self.target]] if self.target else []
            listing = {"nftables": [
                {"set": {"name": "model_ports", "elem": [8001]}},
                {"map": {"name": "front_door", "elem": elem}},
            ]}  # fmt: skip
            return subprocess.CompletedProcess([], 0, json.dumps(listing), "")
        added = [line for line in stdin.splitlines() if "front_door {" in line]
        self.target = int(added[0].split(":")[1].strip(" }")) if added else None
        self.story.append(f"map {self.target}")
        return subprocess.CompletedProcess([], 0, "", "")


@pytest.fixture
def pooled(tmp_path, monkeypatch):
    """A front door that keeps connections (the control service runs): serving 8001."""
    fw = dataclasses.replace(
        FW, wake_port=8401, front_door_flag=str(tmp_path / "run" / "front-door" / "pool-b")
    )
    return MapWithPools(monkeypatch, fw, 8001)


def test_with_kept_connections_a_hold_sends_requests_to_the_wake_listener_then_turns_the_pools(
    pooled,
) -> None:
    """The map first: a request between the two reaches the wake listener (which holds it)
    through the set of connections left; after it, no connection kept to the model being
    drained carries a new request."""
    assert firewall.hold(pooled.fw) is True
    assert pooled.story == ["map 8401", "pool b"]
    flag = Path(pooled.fw.front_door_flag)
    assert flag.parent.stat().st_mode & 0o777 == 0o755, "Caddy (not root) looks for the flag"
    assert firewall.hold(pooled.fw) is False, "held already: nothing turns"
    assert pooled.story == ["map 8401", "pool b"]


def test_with_kept_connections_exposing_a_model_turns_the_pools_before_the_map(pooled) -> None:
    """Towards a model, the other set first: a request between the two reaches the wake
    listener, never a connection to the new model in the set the front door leaves (which the
    next switch would use again while it drains that model)."""
    firewall.hold(pooled.fw)
    assert firewall.set_open(pooled.fw, [8002]) is True
    assert pooled.story == ["map 8401", "pool b", "pool a", "map 8002"]
    firewall.wake(pooled.fw)  # asleep: the map leaves the model for the wake listener
    firewall.set_open(pooled.fw, [8002])  # woken: and back
    assert pooled.story[4:] == ["map 8401", "pool b", "pool a", "map 8002"]


def test_with_kept_connections_a_model_exposed_after_a_stop_keeps_the_pools(pooled) -> None:
    """After `invoke stop` (the map leads nowhere) requests wait in the front door, in the set
    that serves; the next model is reached through that same set."""
    firewall.set_open(pooled.fw, [])
    firewall.set_open(pooled.fw, [8002])
    assert pooled.story == ["map None", "pool b", "map 8002"]


def test_without_kept_connections_nothing_turns(monkeypatch, tmp_path) -> None:
    plain = MapWithPools(monkeypatch, dataclasses.replace(FW, wake_port=8401), 8001)
    firewall.hold(plain.fw)
    firewall.set_open(plain.fw, [8002])
    assert plain.story == ["map None", "map 8002"]


def test_a_pool_flag_that_cannot_be_written_is_one_line(pooled, tmp_path) -> None:
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(HostError) as failure:
        firewall.hold(pooled.fw)
    assert "front door: cannot turn over" in str(failure.value)
    assert "\n" not in str(failure.value)


# --- nvidia-smi ---------------------------------------------------------------------------------


def test_nvidia_smi_answers_parse_with_missing_fields_as_none() -> None:
    h100 = gpu.parse((FIXTURES / "h100-busy.csv").read_text())
    assert h100 == [
        {
            "index": "0",
            "uuid": "GPU-5d3f9a1b-2c3d-4e5f-8a6b-1d6a2e8c7c4e",
            "name": "NVIDIA H100 80GB HBM3",
            "utilization_pct": 97.0,
            "used_mib": 71234,
            "total_mib": 81559,
            "temperature_c": 64.0,
            "power_w": 612.45,
            "power_limit_w": 700.0,
        }
    ]
    idle = gpu.parse((FIXTURES / "rtx5090-idle-na.csv").read_text())[0]
    assert (idle["power_w"], idle["power_limit_w"], idle["total_mib"]) == (None, None, 32607)
    two = gpu.parse((FIXTURES / "two-gpus.csv").read_text())
    assert [g["index"] for g in two] == ["0", "1"]
    assert two[1]["utilization_pct"] is None and two[1]["power_limit_w"] == 140.0


def test_a_failing_or_missing_nvidia_smi_is_no_gpu() -> None:
    failed = subprocess.CompletedProcess([], 9, (FIXTURES / "no-driver.txt").read_text(), "")
    assert gpu.sample(run=lambda *a, **k: failed) is None

    def missing(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    assert gpu.sample(run=missing) is None
    assert gpu.parse((FIXTURES / "no-driver.txt").read_text()) == []


# --- the sampler ----------------------------------------------------------------------------------


def _families(text: str) -> dict[str, list]:
    """Samples by series name (the parser names a counter's family without `_total`)."""
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


@pytest.fixture
def sampled(tmp_path):
    contract = contracts(
        tmp_path,
        {"one": tmp_path / "one.gguf", "two": tmp_path / "two.gguf"},
        metrics=Metrics(tmp_path / "textfile" / "llamavm.prom", 15.0),
        vram={"total_mib": 1536.5},
    )
    fake = fake_systemd(contract, serving=["one"])
    state = store.empty_state()
    state["loads"] = {"one": [3.5, 2.25]}
    store.write_json(contract.paths.state, state)
    history = [
        (0, "switch", True),
        (0, "switch", True),
        (1, "switch", False),
        (2, "switch", False),
        (0, "switch", False),
        (0, "stop", True),
    ]
    for code, op, changed in history:
        outcome = {"code": code, "op": op, "changed": changed, "model": "one", "at": 1.7e9}
        if code == 0 and op == "switch" and changed:
            outcome.update(switch_seconds=4.5, load_seconds=2.25, downtime_seconds=2.5)
        store.count_outcome(contract.paths.counters, outcome)
    return contract, fake


def test_the_sampler_writes_parseable_series_for_models_switches_and_gpus(sampled) -> None:
    contract, fake = sampled
    gpus = gpu.parse((FIXTURES / "two-gpus.csv").read_text())
    text = metrics.collect(contract, fake, gpus, health=fake.health, now=lambda: 1.75e9)
    families = _families(text)
    assert set(metrics.names(text.splitlines())) <= set(metrics.SERIES)

    def value(name, **labels):
        found = [s.value for s in families[name] if all(s.labels.get(k) == v
                                                       for k, v in labels.items())]  # fmt: skip
        assert len(found) == 1, (name, labels, families.get(name))
        return found[0]

    assert value("llamavm_gpu_up") == 1
    assert value("llamavm_gpu_memory_used_bytes", gpu="0") == 30112 * 2**20
    assert value("llamavm_gpu_utilization_ratio", gpu="0") == pytest.approx(0.12)
    assert not [s for s in families["llamavm_gpu_utilization_ratio"] if s.labels["gpu"] == "1"]
    assert value("llamavm_gpu_power_watts", gpu="0") == pytest.approx(187.2)
    assert value("llamavm_model_active", model="one") == 1
    assert value("llamavm_model_active", model="two") == 0
    assert value("llamavm_model_healthy", model="one") == 1
    assert value("llamavm_model_vram_estimate_bytes", model="two") == round(1536.5 * 2**20)
    assert value("llamavm_model_last_load_seconds", model="one") == 2.25
    assert value("llamavm_transactions_total", op="switch", result="ok") == 2
    assert value("llamavm_transactions_total", op="switch", result="rolled_back") == 1
    assert value("llamavm_transactions_total", op="switch", result="refused") == 1
    assert value("llamavm_transactions_total", op="switch", result="unchanged") == 1
    assert value("llamavm_transactions_total", op="stop", result="ok") == 1
    assert value("llamavm_last_switch_downtime_seconds") == 2.5
    assert value("llamavm_last_switch_success") == 0  # the rolled-back one came later
    assert value("llamavm_transaction_in_progress") == 0


def test_without_a_gpu_the_sampler_says_so_and_writes_no_gpu_series(sampled) -> None:
    contract, fake = sampled
    families = _families(metrics.collect(contract, fake, None, health=fake.health))
    assert [s.value for s in families["llamavm_gpu_up"]] == [0]
    assert "llamavm_gpu_memory_used_bytes" not in families


def test_the_textfile_is_replaced_whole(sampled, monkeypatch) -> None:
    contract, fake = sampled
    monkeypatch.setattr(gpu, "sample", lambda: None)
    monkeypatch.setattr(metrics, "collect", lambda c, s, g: "llamavm_gpu_up 0\n")
    target = contract.metrics.textfile
    target.parent.mkdir()
    target.write_text("old\n")
    assert metrics.write(contract, fake) == target
    assert target.read_text() == "llamavm_gpu_up 0\n"
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["llamavm.prom"]


def test_label_values_are_escaped() -> None:
    out = metrics.Writer()
    out.add("llamavm_gpu_info", 1, gpu="0", uuid="u", name='odd "name"\\ \n x')
    family = _families(out.text())["llamavm_gpu_info"]
    assert family[0].labels["name"] == 'odd "name"\\ \n x'
    with pytest.raises(KeyError):
        out.add("llamavm_not_declared", 1)


def test_counters_survive_a_malformed_file(tmp_path) -> None:
    path = tmp_path / "counters.json"
    path.write_text("{not json")
    store.count_outcome(path, {"code": 3, "op": "switch"})
    assert store.read_counters(path)["transactions"] == {"switch": {"lock_timeout": 1}}


def test_a_switch_holds_the_front_door_and_drains_before_the_stop(world, monkeypatch) -> None:
    world.contract = replace(world.contract, drain_s=5.0)
    world.host.contract = world.contract
    in_flight = {"one": 3}
    stops: list[tuple[int | None, int]] = []

    def busy(model, key):
        in_flight["one"] = max(0, in_flight.get(model.name, 0) - 1)  # one finishes per look
        return in_flight["one"] if model.name == "one" else 0

    world.host.in_flight = busy  # type: ignore[method-assign]
    stop = world.fake.stop

    def watched_stop(units):
        stops.append((world.nft.front, in_flight["one"]))
        stop(units)

    world.fake.stop = watched_stop  # type: ignore[method-assign]
    result = switch_tx(world.host).switch("two")
    # the front door led nowhere and nothing was in flight when the old model stopped
    assert stops[0] == (None, 0)
    assert world.nft.front == 8002 and world.nft.ports == [8002]
    assert any("waiting for" in e and "in flight on one" in e for e in world.events)
    assert result["phases"]["drain"] >= 0


def test_the_drain_is_bounded(world) -> None:
    world.host.contract = world.contract = replace(world.contract, drain_s=2.0)
    world.host.in_flight = lambda model, key: 1  # type: ignore[method-assign]
    before = world.fake.now
    switch_tx(world.host).switch("two")
    assert 2.0 <= world.fake.now - before < 10
    assert any("still in flight after 2s" in e for e in world.events)


def test_a_rolled_back_switch_points_the_front_door_back(world) -> None:
    def refuse(model):
        raise HostError(f"{model.name}: /props answered 500")

    world.host.verify = refuse  # type: ignore[method-assign]
    with pytest.raises(HostError):
        switch_tx(world.host).switch("two")
    assert "hold" in world.nft.log
    assert world.nft.front == 8001 and world.nft.ports == [8001]


# --- the API key rotation ------------------------------------------------------------------------


@pytest.fixture
def keyed(world):
    world.host.contract = world.contract = replace(world.contract, api_key_policy="required")
    world.contract.api_key_file.write_text("k" * 40 + "\n")
    world.contract.api_key_file.chmod(0o600)
    return world


def test_rotating_the_key_restarts_the_serving_model_with_the_new_one(keyed) -> None:
    started_with: list[str] = []
    start = keyed.fake.start

    def start_reading_the_key(unit):
        started_with.append(keyed.contract.api_key_file.read_text().strip())
        return start(unit)

    keyed.fake.start = start_reading_the_key  # type: ignore[method-assign]
    result = Transaction(keyed.host, "abc200", "rotate-key").rotate_key()
    new = keyed.contract.api_key_file.read_text().strip()
    assert result == {"changed": True, "restarted": "one"}
    assert new != "k" * 40 and len(new) >= 32
    assert keyed.contract.api_key_file.stat().st_mode & 0o777 == 0o600
    assert started_with == [new]


def _refusing_once() -> Callable[[Any], None]:
    """A verify that refuses the first model it sees (a restart with the new key fails)."""
    calls = []

    def refuse_once(model):
        calls.append(model.name)
        if len(calls) == 1:
            raise HostError(f"{model.name}: a one-token completion answered 401")

    return refuse_once


def test_a_failed_restart_puts_the_old_key_back(keyed) -> None:
    keyed.host.verify = _refusing_once()  # type: ignore[method-assign]
    with pytest.raises(HostError) as failure:
        Transaction(keyed.host, "abc201", "rotate-key").rotate_key()
    assert failure.value.code == EXIT_FAILED
    assert keyed.contract.api_key_file.read_text().strip() == "k" * 40
    assert keyed.fake.running_units() == ["llamavm-model-one.service"]


def test_a_key_rewritten_in_place_keeps_its_file_and_a_failed_restart_puts_it_back(keyed) -> None:
    """Compose: every container mounts the key file by path; a rotation rewrites that file
    (same inode, owner and mode), and a failed restart writes the old key back into it."""
    keyed.host.contract = keyed.contract = replace(keyed.contract, api_key_in_place=True)
    path = keyed.contract.api_key_file
    path.chmod(0o640)
    before = path.stat()
    Transaction(keyed.host, "abc203", "rotate-key").rotate_key()
    after = path.stat()
    assert (after.st_ino, after.st_mode, after.st_uid) == (before.st_ino, before.st_mode,
                                                            before.st_uid)  # fmt: skip
    new = path.read_text().strip()
    assert new != "k" * 40 and len(new) >= 32 and path.read_text().count("\n") == 1
    keyed.host.verify = _refusing_once()  # type: ignore[method-assign]
    with pytest.raises(HostError):
        Transaction(keyed.host, "abc204", "rotate-key").rotate_key()
    assert path.read_text().strip() == new and path.stat().st_ino == before.st_ino


def test_without_a_key_policy_there_is_nothing_to_rotate(world) -> None:
    with pytest.raises(HostError, match="policy is none") as failure:
        Transaction(world.host, "abc202", "rotate-key").rotate_key()
    assert failure.value.code == EXIT_REFUSED
