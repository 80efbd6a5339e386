"""Prompt caches across a switch (issue 24): the slots of the model that stops are saved
(llama-server's /slots?action=save into its --slot-save-path), and restored after the next
start of the same model — only into the same unit, build and GGUF; a failure is told, never
fails the switch. Against a fake systemd and a fake server; the real one runs on the test bed
(tests/integration/test_prompt_cache.py, bench/prompt_cache.py)."""

from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from llamavm.artifacts import contract
from llamavm.errors import LlamavmError
from llamavm.host import status, store
from llamavm.host.contract import parse as parse_contract
from llamavm.host.transaction import Transaction
from llamavm.inputs import catalog
from tests.unit.fakes.catalog import VALID, catalog_file
from tests.unit.fakes.host import contracts, fake_systemd, host_on, warm_checks


class Server:
    """The slot endpoints of the model servers: what each slot holds, what was asked."""

    def __init__(self) -> None:
        self.held: dict[tuple[int, int], int] = {}  # (port, slot) -> tokens
        self.files: dict[tuple[int, str], int] = {}  # (port, filename) -> tokens
        self.calls: list[str] = []
        self.fail: str | None = None

    def __call__(self, url: str, body: Any = None, key: Any = None, timeout: float = 5):
        port = int(url.split(":")[2].split("/")[0])
        path, _, query = url.partition("?")
        slot = int(path.rsplit("/", 1)[1])
        action = query.removeprefix("action=")
        self.calls.append(f"{port} {action} {slot}")
        if self.fail == action:
            raise OSError("connection reset")
        if action == "save":
            tokens = self.held.get((port, slot), 0)
            self.files[(port, body["filename"])] = tokens
            return 200, {"id_slot": slot, "n_saved": tokens, "n_written": tokens * 10}
        tokens = self.files.get((port, body["filename"]), 0)
        self.held[(port, slot)] = tokens
        return 200, {"id_slot": slot, "n_restored": tokens, "n_read": tokens * 10}


@pytest.fixture
def world(tmp_path, monkeypatch):
    """'one' (2 slots, prompt cache on, serving) and 'two' (prompt cache off)."""
    warm_checks(monkeypatch)
    base = contracts(tmp_path, {"one": tmp_path / "one.gguf", "two": tmp_path / "two.gguf"})
    one = replace(base.models[0], parallel=2, slot_dir=tmp_path / "slots" / "one")
    host_contract = replace(base, models=(one, base.models[1]))
    (tmp_path / "one.gguf").write_bytes(b"GGUF one")
    (host_contract.paths.units_live / one.unit).write_text("[Service]\nExecStart=/bin/one\n")
    fake = fake_systemd(host_contract, serving=["one"])
    server = Server()
    lines: list[str] = []
    host = host_on(host_contract, fake, lines.append, server_request=server)
    return SimpleNamespace(contract=host_contract, fake=fake, server=server, host=host, lines=lines)


def _switch(world, name: str) -> dict[str, Any]:
    return Transaction(world.host, f"tx{len(world.lines)}", "switch").switch(name)


def test_a_switch_away_saves_the_slots_and_the_switch_back_restores_them(world) -> None:
    world.server.held = {(8001, 0): 1200, (8001, 1): 20}
    away = _switch(world, "two")
    assert world.server.calls == ["8001 save 0", "8001 save 1"]  # before 'one' stopped
    assert "cache_save" in away["phases"]
    record = store.load_state(world.contract.paths.state)["slots"]["one"]
    assert record["slots"] == {"0": 1200}  # a slot with next to nothing is not kept
    assert any("saved 1200 tokens of one" in line for line in world.lines)
    assert status.report(world.contract, world.fake)["models"][0]["prompt_cache"] == {"0": 1200}
    world.server.held = {}  # the server's memory is gone with its process
    back = _switch(world, "one")
    assert world.server.calls[-1] == "8001 restore 0"
    assert world.server.held[(8001, 0)] == 1200
    assert back["cache_restored_tokens"] == 1200 and "cache_restore" in back["phases"]
    assert any("restored 1200 tokens of one" in line for line in world.lines)


def test_a_model_without_a_prompt_cache_is_neither_saved_nor_restored(world) -> None:
    _switch(world, "two")
    calls = list(world.server.calls)
    _switch(world, "one")  # 'two' (no slot directory) stops: nothing asked of it
    assert [c for c in world.server.calls[len(calls) :] if c.startswith("8002")] == []


@pytest.mark.parametrize("change", ["unit", "build", "gguf"])
def test_slots_saved_for_another_unit_build_or_file_are_not_restored(world, change) -> None:
    world.server.held = {(8001, 0): 900}
    _switch(world, "two")
    if change == "unit":
        path = world.contract.paths.units_live / world.contract.models[0].unit
        path.write_text("[Service]\nExecStart=/bin/one --ctx-size 9\n")
    elif change == "build":
        world.contract.paths.llama_server.with_name("new").write_text("")
        world.contract.paths.llama_server.symlink_to("new")
    else:
        world.contract.models[0].gguf.write_bytes(b"GGUF one, another quant")
    result = _switch(world, "one")
    assert "restore" not in " ".join(world.server.calls)
    assert "cache_restored_tokens" not in result
    assert any("not restored" in line for line in world.lines)
    assert "one" not in store.load_state(world.contract.paths.state)["slots"]  # forgotten


@pytest.mark.parametrize("action", ["save", "restore"])
def test_a_slot_that_fails_to_save_or_restore_never_fails_the_switch(world, action) -> None:
    world.server.held = {(8001, 0): 50}
    world.server.fail = action
    _switch(world, "two")
    result = _switch(world, "one")
    assert result["model"] == "one"
    assert world.fake.running_units() == ["llamavm-model-one.service"]
    assert any(f"not {action}d (connection reset)" in line for line in world.lines)


def test_a_restart_of_the_same_model_keeps_its_cache(world) -> None:
    world.server.held = {(8001, 1): 300}
    result = Transaction(world.host, "rs1", "restart").restart()
    assert result["restarted"] == "one"
    assert world.server.calls == ["8001 save 0", "8001 save 1", "8001 restore 1"]


def test_sleep_saves_the_slots_and_the_wake_restores_them(world) -> None:
    world.server.held = {(8001, 0): 77}
    Transaction(world.host, "sl1", "sleep").sleep("one")
    world.server.held = {}
    _switch(world, "one")
    assert world.server.held[(8001, 0)] == 77


# --- the catalog and the contract ---------------------------------------------------------------


def _built(tmp_path, **model: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    data["models"][0].update(model)
    path = catalog_file(tmp_path, data)
    return contract.build(catalog.load(path), {})


def test_the_server_saves_its_slots_in_a_directory_systemd_makes_for_it(tmp_path) -> None:
    data = _built(tmp_path)
    alpha = data["models"][0]
    assert alpha["slot_dir"] == "/var/cache/llamavm/slots/alpha"
    assert alpha["argv"][alpha["argv"].index("--slot-save-path") + 1] == alpha["slot_dir"]
    assert alpha["systemd"]["cache_directory"] == "llamavm/slots/alpha"
    assert parse_contract(data).models[0].slot_dir is not None
    off = _built(tmp_path, prompt_cache=False)["models"][0]
    assert off["slot_dir"] is None and "--slot-save-path" not in off["argv"]
    assert off["systemd"]["cache_directory"] is None


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_a_prompt_cache_that_is_not_a_boolean_is_refused(tmp_path, value) -> None:
    with pytest.raises(catalog.CatalogError) as caught:
        _built(tmp_path, prompt_cache=value)
    assert "models[0] (alpha).prompt_cache" in str(caught.value)


def test_slot_save_path_in_extra_args_is_refused_it_is_llamavms(tmp_path) -> None:
    with pytest.raises(catalog.CatalogError) as caught:
        _built(tmp_path, extra_args=["--slot-save-path", "/tmp"])
    assert "prompt_cache" in str(caught.value)


def test_a_slot_directory_outside_var_cache_is_refused(tmp_path) -> None:
    text = contract.HOST_CONFIG.read_text().replace(
        "slot_dir: /var/cache/llamavm/slots", "slot_dir: /srv/slots"
    )
    path = tmp_path / "host.yaml"
    path.write_text(text)
    with pytest.raises(LlamavmError) as caught:
        contract.load_host_config(path)
    assert "paths.slot_dir" in str(caught.value) and "/var/cache" in str(caught.value)
