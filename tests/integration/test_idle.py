"""Idle unload and wake on the test bed, from the LAN client's namespace (issue 24): the default
model with `idle_unload_s: 5` stops by itself (no llama-server left, the firewall's front-door
map on the wake listener, "asleep" in status, /models and the metrics); a chat through the front
door and one through the routing endpoint each wake it and get the model's answer; concurrent
requests to a sleeping model all get answers from one wake; a sampler never sees two models.
The module provisions the test bed back to its own catalog afterwards."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from llamavm import REPO_ROOT
from llamavm.inputs import catalog
from tests.integration.helpers import (
    TESTBED_CATALOG,
    active_units,
    clear_failpoints,
    client_curl,
    host_run,
    http_code,
    invoke,
    set_failpoints,
    url,
    wait_for,
)

pytestmark = pytest.mark.testbed

IDLE_S = 5


def _answer(name: str) -> str:
    entries = yaml.safe_load((REPO_ROOT / "config" / "tiny-models.yaml").read_text())
    return next(e["answer"] for e in entries if e["name"] == name)


@pytest.fixture(scope="module")
def idle_bed(provisioned, tmp_path_factory) -> Iterator[tuple[catalog.Catalog, Path]]:
    """The test bed with its default model idling out after IDLE_S, serving it: (catalog, file)."""
    data = yaml.safe_load(TESTBED_CATALOG.read_text())
    default = data["settings"]["default_model"]
    for model in data["models"]:
        if model["name"] == default:
            model["idle_unload_s"] = IDLE_S
    path = tmp_path_factory.mktemp("idle") / "models.idle.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = invoke("provision", "--catalog", str(path))
    try:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr
        switched = invoke("switch", "--model", default, "--catalog", str(path))
        assert switched.returncode == 0, switched.stdout + switched.stderr
        yield catalog.load(path), path
    finally:
        restored = invoke("provision")
        assert restored.returncode == 0, restored.stdout[-4000:] + restored.stderr
        back = invoke("switch", "--model", default)
        assert back.returncode == 0, back.stdout + back.stderr


class Sampler:
    """How many model units are up, sampled on the host twice a second for as long as it runs."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.counts.append(len(active_units()))
            self._stop.wait(0.5)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _status(path: Path) -> dict:
    result = invoke("status", "--json", "--catalog", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    return next(iter(json.loads(result.stdout).values()))


def _asleep(path: Path) -> str | None:
    return (_status(path).get("asleep") or {}).get("model")


def _chat(address: str, *, model: str | None = None, timeout: float = 150) -> tuple[int, dict]:
    body: dict = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}
    if model:
        body["model"] = model
    answer = client_curl(
        address, "-X", "POST", "-H", "Content-Type: application/json", "-d", json.dumps(body),
        timeout=timeout,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    text, code = answer.stdout.rsplit("\n", 1)
    return int(code), json.loads(text) if text.startswith("{") else {"raw": text}


def _content(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


def _switches() -> int:
    """Switch transactions the host has finished (its metrics' counters)."""
    paths = json.loads(host_run("cat /etc/llamavm/contract.json").stdout)["paths"]
    counters = json.loads(host_run(f"cat {paths['counters']}").stdout or "{}")
    return sum(counters.get("transactions", {}).get("switch", {}).values())


def _fall_asleep(cat: catalog.Catalog, path: Path) -> None:
    wait_for(lambda: _asleep(path) == cat.default.name, IDLE_S + 30, "the idle model asleep", 1)


def test_an_idle_model_sleeps_by_itself_and_the_front_door_wakes_it(idle_bed, host) -> None:
    cat, path = idle_bed
    model = cat.default
    front = f"http://{host}:{cat.settings.reserved_ports['proxy']}/v1/chat/completions"
    with Sampler() as sampler:
        _fall_asleep(cat, path)
        assert host_run("pgrep -c -x llama-server || true").stdout.strip() == "0"
        assert active_units() == []
        assert http_code(url(host, model, "/health")) is None  # its own port is closed
        listed = host_run("nft -j list map inet llamavm front_door").stdout
        assert [8400, 8401] in json.loads(listed)["nftables"][1]["map"]["elem"]
        text = invoke("status", "--catalog", str(path)).stdout
        assert f"{model.name} (asleep" in text, text
        code, reply = _chat(front)
        assert code == 200, reply
        assert _content(reply) == _answer(model.name)
        assert _status(path)["active"] == model.name
        assert http_code(url(host, model, "/health")) == 200  # exposed again, as after a switch
    assert sampler.counts and max(sampler.counts) <= 1, sampler.counts
    assert 0 in sampler.counts and 1 in sampler.counts


def test_the_routing_endpoint_wakes_it_too(idle_bed, host) -> None:
    cat, path = idle_bed
    _fall_asleep(cat, path)
    routed = f"http://{host}:{cat.settings.control.port}/v1/chat/completions"
    code, reply = _chat(routed, model=cat.default.aliases[0])
    assert code == 200, reply
    assert _content(reply) == _answer(cat.default.name)
    assert _status(path)["active"] == cat.default.name


def test_a_sleep_killed_after_its_stop_is_finished_and_the_front_door_still_wakes_it(
    idle_bed, host
) -> None:
    cat, path = idle_bed
    model = cat.default
    front = f"http://{host}:{cat.settings.reserved_ports['proxy']}/v1/chat/completions"
    code, _ = _chat(front)  # awake, serving
    assert code == 200 and _status(path)["active"] == model.name
    set_failpoints({"after_sleep_stop": {"kill": True}})  # the sleep's process dies mid-way
    try:
        _fall_asleep(cat, path)  # recorded first, so its recovery finishes it
    finally:
        clear_failpoints()
    assert active_units() == []
    listed = host_run("nft -j list map inet llamavm front_door").stdout
    assert [8400, 8401] in json.loads(listed)["nftables"][1]["map"]["elem"]
    code, reply = _chat(front)
    assert code == 200, reply
    assert _content(reply) == _answer(model.name)
    assert _status(path)["active"] == model.name


def test_the_picker_view_and_the_metrics_say_asleep(idle_bed, host) -> None:
    cat, path = idle_bed
    _fall_asleep(cat, path)
    listing = client_curl(f"http://{host}:{cat.settings.control.port}/models")
    body = json.loads(listing.stdout.rsplit("\n", 1)[0])
    flags = {m["name"]: (m["asleep"], m["active"]) for m in body["models"]}
    assert flags[cat.default.name] == (True, False), flags
    assert host_run("systemctl start llamavm-metrics.service").returncode == 0
    scrape = client_curl(f"http://{host}:{cat.settings.reserved_ports['node_exporter']}/metrics")
    assert f'llamavm_model_asleep{{model="{cat.default.name}"}} 1' in scrape.stdout


def test_concurrent_requests_to_a_sleeping_model_all_get_answers_from_one_wake(
    idle_bed, host
) -> None:
    cat, path = idle_bed
    _fall_asleep(cat, path)
    front = f"http://{host}:{cat.settings.reserved_ports['proxy']}/v1/chat/completions"
    before = _switches()
    began = time.monotonic()
    with Sampler() as sampler, ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(pool.map(lambda _i: _chat(front), range(4)))
    assert all(code == 200 for code, _ in replies), replies
    assert {_content(reply) for _, reply in replies} == {_answer(cat.default.name)}
    assert max(sampler.counts) <= 1, sampler.counts
    started = _switches() - before
    assert started == 1, f"{started} wakes for 4 requests in {time.monotonic() - began:.1f}s"
