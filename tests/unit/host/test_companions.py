"""Companions (issue 24): the catalog's rules for `companion`, `task` and `draft` (hostile values
refused in one line like every other key), the admission arithmetic (computed here by hand),
the draft counted in its big model's estimate, the units and argv the contract derives, and the
transaction keeping, stopping and starting companions as the admission says (fake systemd)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamavm.artifacts import contract
from llamavm.host.routing import companion_route, model_list
from llamavm.inputs import catalog, vram
from tests.unit.fakes.gguf_files import LAYER_BYTES, N_HEAD_KV, N_LAYER, write_model
from tests.unit.fakes.host import Unit, contracts, fake_systemd, host_on, switch_tx, warm_checks

BUDGET, RESERVE = 32607, 1024


def _data(**big_extra: Any) -> dict[str, Any]:
    return {
        "settings": {
            "share_path": "/srv/models",
            "default_model": "big",
            "vram": {"budget_mib": BUDGET, "reserve_mib": RESERVE, "compute_mib": 256},
        },
        "models": [
            {"name": "big", "gguf": "big.gguf", "port": 8001, "vram_mib": 20000, **big_extra},
            {"name": "huge", "gguf": "huge.gguf", "port": 8002, "vram_mib": 31000},
            {"name": "embed", "gguf": "e.gguf", "port": 8011, "companion": True,
             "task": "embeddings", "vram_mib": 600},
            {"name": "small", "gguf": "s.gguf", "port": 8012, "companion": True,
             "vram_mib": 400},
        ],
    }  # fmt: skip


def _parse(data: dict[str, Any], tmp_path: Path) -> catalog.Catalog:
    return catalog.parse(yaml.safe_dump(data), tmp_path / "models.yaml")


def _refused(data: dict[str, Any], tmp_path: Path) -> str:
    with pytest.raises(catalog.CatalogError) as failure:
        _parse(data, tmp_path)
    message = str(failure.value)
    assert "\n" not in message and "models.yaml: " in message and " — " in message
    return message


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))


# --- the catalog ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "key", "value", "fragment"),
    [
        (2, "companion", "yes", "models[2] (embed).companion"),
        (2, "companion", 1, "models[2] (embed).companion"),
        (2, "task", "chat; rm -rf /", "is not a task"),
        (2, "task", ["embeddings"], "is not a task"),
        (0, "draft", 5, "models[0] (big).draft"),
        (0, "draft", "", "models[0] (big).draft"),
        (0, "draft", "x" * 65, "models[0] (big).draft"),
        (0, "draft", "nobody", "'nobody' is not a companion in the catalog"),
        (0, "draft", "huge", "'huge' is not a companion in the catalog"),
        (0, "draft", "embed", "'embed' serves embeddings, a draft model must be a chat model"),
        (3, "draft", "small", "a companion has no draft model of its own"),
        (3, "idle_unload_s", 5, "a companion stays loaded beside the big model"),
        (3, "load", "stage", "a companion reads the share"),
        (1, "task", "rerank", "served by a companion, and this is a big (exclusive) model"),
    ],
)
def test_hostile_companion_values_are_refused(tmp_path, index, key, value, fragment) -> None:
    data = _data()
    data["models"][index][key] = value
    assert fragment in _refused(data, tmp_path)


def test_a_companion_is_no_default_and_not_everything_is_one(tmp_path) -> None:
    data = _data()
    data["settings"]["default_model"] = "embed"
    assert "is a companion" in _refused(data, tmp_path)
    data = _data()
    for model in data["models"][:2]:
        model["companion"] = True
    assert "every model is a companion" in _refused(data, tmp_path)


def test_companions_and_big_models_are_told_apart(tmp_path) -> None:
    cat = _parse(_data(draft="small"), tmp_path)
    assert [m.name for m in cat.big] == ["big", "huge"]
    assert [m.name for m in cat.companions] == ["embed", "small"]
    assert cat.resolve("embed").unit == "llamavm-companion-embed.service"
    assert cat.resolve("big").draft == "small" and cat.load_mode(cat.resolve("embed")) == "share"


# --- the admission ------------------------------------------------------------------------------


def _totals(cat: catalog.Catalog) -> dict[str, float | None]:
    return {m.name: vram.estimate(cat, m).total_mib for m in cat.models}


def test_the_admission_keeps_what_fits_in_catalog_order(tmp_path) -> None:
    cat = _parse(_data(), tmp_path)
    admitted = vram.admission(cat, _totals(cat))
    # big: 20000 + 600 + 400 + 1024 = 22024 <= 32607: both beside it.
    assert admitted["big"] == {"beside": ["embed", "small"], "stopped": {}}
    # huge: 31000 + 600 + 1024 = 32624 > 32607: embed stops; 31000 + 400 + 1024 = 32424 fits.
    assert admitted["huge"]["beside"] == ["small"]
    assert admitted["huge"]["stopped"] == {
        "embed": "huge 31000 MiB + embed 600 MiB + reserve 1024 MiB = 32624 MiB > budget 32607 MiB"
    }


def test_a_sum_equal_to_the_budget_fits(tmp_path) -> None:
    data = _data()
    data["models"][1]["vram_mib"] = BUDGET - RESERVE - 600 - 400
    cat = _parse(data, tmp_path)
    assert vram.admission(cat, _totals(cat))["huge"]["beside"] == ["embed", "small"]
    data["models"][1]["vram_mib"] += 1
    cat = _parse(data, tmp_path)
    assert vram.admission(cat, _totals(cat))["huge"]["beside"] == ["embed"]


def test_no_estimate_is_never_admitted(tmp_path) -> None:
    data = _data()
    del data["models"][2]["vram_mib"]  # the controller cannot see the share
    cat = _parse(data, tmp_path)
    admitted = vram.admission(cat, _totals(cat))
    assert admitted["big"]["beside"] == ["small"]
    assert "no VRAM estimate for embed" in admitted["big"]["stopped"]["embed"]
    vram.check_companions(cat, _totals(cat))  # unknown counts for nothing in the sum


def test_companions_that_do_not_fit_together_are_refused_with_the_numbers(tmp_path) -> None:
    data = _data()
    data["models"][2]["vram_mib"], data["models"][3]["vram_mib"] = 20000, 12000
    cat = _parse(data, tmp_path)
    with pytest.raises(vram.AdmissionError) as failure:
        vram.check_companions(cat, _totals(cat))
    message = str(failure.value)
    assert (
        "companions: embed 20000 MiB + small 12000 MiB + reserve 1024 MiB = 33024 MiB > budget "
        "32607 MiB" in message
    )
    assert "\n" not in message and failure.value.exit_code == 2


def test_a_draft_is_counted_in_its_big_model(tmp_path) -> None:
    write_model(tmp_path / "big.gguf")
    write_model(tmp_path / "s.gguf")
    data = _data(draft="small", ctx_size=1024, cache_type="f16")
    del data["models"][0]["vram_mib"]
    del data["models"][3]["vram_mib"]
    data["settings"]["controller_share_path"] = str(tmp_path)
    data["models"][3].update(ctx_size=256, n_gpu_layers=2)
    cat = _parse(data, tmp_path)
    with_draft = vram.estimate(cat, cat.resolve("big"))
    # The draft's last two layers on the GPU, with a KV cache as long as big's (1024), f16.
    head_dim = 256 // 8
    draft_kv = 1024 * 2 * 2 * N_HEAD_KV * head_dim * 2
    assert with_draft.draft_mib == pytest.approx((2 * LAYER_BYTES + draft_kv) / vram.MIB)
    alone = vram.estimate(cat, dataclasses.replace(cat.resolve("big"), draft=None))
    assert with_draft.total_mib == pytest.approx(alone.total_mib + with_draft.draft_mib)
    assert N_LAYER > 2
    data["models"][3]["vram_mib"] = 700  # an override stands for the draft as well
    cat = _parse(data, tmp_path)
    assert vram.estimate(cat, cat.resolve("big")).draft_mib == 700


# --- the contract -------------------------------------------------------------------------------


def test_the_front_door_routes_each_task_to_its_first_companion(tmp_path) -> None:
    data = _data()
    data["models"].append({"name": "embed2", "gguf": "e2.gguf", "port": 8013,
                           "companion": True, "task": "embeddings", "vram_mib": 100})  # fmt: skip
    data["models"].append({"name": "ranker", "gguf": "r.gguf", "port": 8014,
                           "companion": True, "task": "rerank", "vram_mib": 100})  # fmt: skip
    cat = _parse(data, tmp_path)
    built = contract.build(cat, {m.name: vram.estimate(cat, m).as_dict() for m in cat.models})
    routes = {r["task"]: r for r in built["front_door"]["companions"]}
    assert routes["embeddings"]["name"] == "embed" and routes["embeddings"]["port"] == 8011
    assert "/v1/embeddings" in routes["embeddings"]["paths"]
    assert routes["rerank"]["name"] == "ranker" and routes["rerank"]["port"] == 8014
    assert "/v1/rerank" in routes["rerank"]["paths"]
    # Without a companion of a task, nothing is routed beside the big model.
    plain = _parse({**_data(), "models": _data()["models"][:2]}, tmp_path)
    built = contract.build(plain, {m.name: vram.estimate(plain, m).as_dict() for m in plain.models})
    assert built["front_door"]["companions"] == []


def test_the_contract_keeps_companions_out_of_the_conflicts(tmp_path) -> None:
    cat = _parse(_data(draft="small"), tmp_path)
    estimates = {m.name: vram.estimate(cat, m).as_dict() for m in cat.models}
    built = contract.build(cat, estimates)
    big = {m["name"]: m for m in built["models"]}
    assert list(big) == ["big", "huge"]
    assert big["big"]["systemd"]["conflicts"] == ["llamavm-model-huge.service"]
    assert big["huge"]["companions"] == ["small"] and "embed" in big["huge"]["companions_stopped"]
    companions = {m["name"]: m for m in built["companions"]}
    embed = companions["embed"]
    assert embed["unit"] == "llamavm-companion-embed.service"
    assert embed["systemd"]["conflicts"] == [] and embed["systemd"]["after"] == []
    assert "--embeddings" in embed["argv"] and embed["slot_dir"] is None
    argv = big["big"]["argv"]
    at = argv.index("--model-draft")
    assert argv[at + 1] == "/srv/models/s.gguf" and argv[argv.index("--spec-type") + 1] == (
        "draft-simple"
    )
    assert 8011 in built["firewall"]["model_ports"]


# --- the transaction ------------------------------------------------------------------------


@pytest.fixture
def world(tmp_path, monkeypatch):
    """'big' (embed and small beside it) and 'huge' (only small beside it); big serves."""
    warm_checks(monkeypatch)
    base = contracts(tmp_path, {"big": tmp_path / "b.gguf", "huge": tmp_path / "h.gguf"})
    big, huge = base.models
    big = dataclasses.replace(big, companions=("embed", "small"))
    huge = dataclasses.replace(
        huge, companions=("small",), companions_stopped={"embed": "huge 31000 MiB + ... > budget"}
    )
    companions = tuple(
        dataclasses.replace(
            big,
            name=name,
            unit=f"llamavm-companion-{name}.service",
            port=port,
            aliases=(),
            base_url=f"http://127.0.0.1:{port}",
            health_url=f"http://127.0.0.1:{port}/health",
            companion=True,
            companions=(),
            task=task,
        )
        for name, port, task in (("embed", 8011, "embeddings"), ("small", 8012, "chat"))
    )
    world_contract = dataclasses.replace(base, models=(big, huge), companions=companions)
    fake = fake_systemd(world_contract, serving=["big", "embed", "small"])
    lines: list[str] = []
    host = host_on(world_contract, fake, lines.append)
    return world_contract, fake, host, lines


def test_a_switch_stops_the_companions_that_do_not_fit_and_says_why(world) -> None:
    _, fake, host, lines = world
    result = switch_tx(host).switch("huge")
    assert result["model"] == "huge"
    assert result["companions"]["stopped"] == {"embed": "huge 31000 MiB + ... > budget"}
    assert fake.units["llamavm-companion-embed.service"].active == "inactive"
    assert fake.units["llamavm-companion-small.service"].active == "active"  # kept, not restarted
    assert not [c for c in fake.calls if c == ("start", "llamavm-companion-small.service")]
    said = "\n".join(lines)
    assert "companion embed stops: it does not fit beside huge (huge 31000 MiB" in said
    # Stopped with the old model, before the new one loads: its memory is free first.
    stop = next(i for i, c in enumerate(fake.calls) if "llamavm-companion-embed.service" in c)
    start = fake.calls.index(("start", "llamavm-model-huge.service"))
    assert fake.calls[stop][0] == "stop" and stop < start


def test_the_switch_back_starts_them_again_after_the_big_model(world) -> None:
    _, fake, host, _ = world
    switch_tx(host).switch("huge")
    result = switch_tx(host).switch("big")
    assert result["companions"]["started"] == ["embed"]
    big_start = fake.calls.index(("start", "llamavm-model-big.service"))
    embed_start = fake.calls.index(("start", "llamavm-companion-embed.service"))
    assert big_start < embed_start
    assert sorted(fake.running_units()) == [
        "llamavm-companion-embed.service", "llamavm-companion-small.service",
        "llamavm-model-big.service",
    ]  # fmt: skip


def test_a_companion_that_fails_to_start_does_not_fail_the_switch(world) -> None:
    _, fake, host, lines = world
    switch_tx(host).switch("huge")
    fake.units["llamavm-companion-embed.service"] = Unit(behaviour="exits")
    result = switch_tx(host).switch("big")
    assert result["model"] == "big"
    assert "embed" in result["companions"]["failed"]
    assert any("companion embed did not start" in line for line in lines)


def test_a_switch_to_the_serving_model_repairs_a_missing_companion(world) -> None:
    _, fake, host, _ = world
    fake.stop(["llamavm-companion-embed.service"])
    result = switch_tx(host).switch("big")
    assert result["changed"] is True and result["companions"]["started"] == ["embed"]


def test_stop_leaves_the_gpu_free(world) -> None:
    _, fake, host, _ = world
    result = switch_tx(host).stop()
    assert sorted(result["stopped"]) == ["big", "embed", "small"]
    assert fake.running_units() == []


def test_the_drift_probe_names_a_companion_that_should_run(world) -> None:
    contract_, fake, host, _ = world
    for model in (*contract_.models, *contract_.companions):
        for folder in (contract_.paths.units_staged, contract_.paths.units_live):
            (folder / model.unit).write_text(f"[Service]\nExecStart=/x {model.name}\n")
    assert switch_tx(host).drift() == []
    fake.stop(["llamavm-companion-small.service"])
    assert switch_tx(host).drift() == ["companion small is not running beside big"]


# --- routing ----------------------------------------------------------------------------------


def test_requests_for_a_companion_are_routed_to_it(world) -> None:
    contract_, *_ = world
    assert companion_route(contract_, "embed", "embeddings").name == "embed"
    assert companion_route(contract_, None, "embeddings").name == "embed"
    assert companion_route(contract_, "", "embeddings").name == "embed"
    assert companion_route(contract_, "small", "chat/completions").name == "small"
    assert companion_route(contract_, None, "chat/completions") is None
    assert companion_route(contract_, "big", "embeddings") is None
    assert companion_route(contract_, None, "rerank") is None  # no reranker companion
    listed = {m["id"]: m for m in model_list(contract_, "big")["data"]}
    assert listed["embed"]["companion"] is True and listed["embed"]["task"] == "embeddings"
