"""Every way in under the load of a few devices, from the LAN client's namespace: concurrent
streams through the front door and the routing endpoint with an ordinary keep-alive client
(tests/integration/clients/streams.py), and the same across switches. Any error or stream cut
short fails. The ratios against the model's own port are bench/load.py's (never a timing
assertion here)."""

from __future__ import annotations

from typing import Any

import pytest

from llamavm.inputs import catalog
from tests.integration.helpers import invoke
from tests.integration.load import finish, run_client, sampling, summary

pytestmark = pytest.mark.testbed

STREAMS = 32


def _ways(host: str, cat: catalog.Catalog) -> dict[str, str]:
    settings = cat.settings
    assert settings.expose.front_door.enabled and settings.control.routing, "the test bed has both"
    return {
        "front door": f"http://{host}:{settings.reserved_ports['proxy']}",
        "routing endpoint": f"http://{host}:{settings.control.port}",
    }


def _burst(url: str, names: list[str], requests: int) -> dict[str, Any]:
    return {"target": url, "url": url, "requests": requests, "concurrency": STREAMS,
            "stream": True, "models": names, "max_tokens": 16}  # fmt: skip


def _failures(done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for b in done for r in b["results"] if not r["ok"]]


def test_32_concurrent_streams_through_the_front_door_and_the_routing_endpoint(
    serving_default, models, host
) -> None:
    ways = _ways(host, models)
    # Two bursts each, interleaved: the second reuses the kept-alive connections of the first
    # after they sat idle through the other way's burst (llama-server drops idle ones at 5 s).
    bursts = [_burst(url, [serving_default.name], 3 * STREAMS) for url in ways.values()] * 2
    done = finish(run_client({"bursts": bursts}, None))
    for name, url in ways.items():
        mine = [b for b in done if b["url"] == url]
        failed = _failures(mine)
        assert not failed, f"{name}: {len(failed)} failed, e.g. {failed[:3]}"
        assert summary(mine)["requests"] == 6 * STREAMS


def test_32_streams_through_the_front_door_wait_through_two_switches(
    serving_default, models, host
) -> None:
    other = next(m for m in models.big if m != serving_default)
    url = _ways(host, models)["front door"]
    with sampling() as seen:
        client = run_client({"bursts": [_burst(url, [serving_default.name], 8 * STREAMS)]}, None)
        switched = [invoke("switch", "--model", m.name) for m in (other, serving_default)]
        done = finish(client)
    assert [s.returncode for s in switched] == [0, 0], [s.stdout + s.stderr for s in switched]
    failed = _failures(done)
    assert not failed, f"{len(failed)} of {8 * STREAMS} failed, e.g. {failed[:3]}"
    assert seen["samples"] > 10 and seen["max"] == 1, seen  # never two big models at once
    # The front door followed the switch while the load went on: the requests held during the
    # first one went to the other model. (A connection kept to the model being drained would
    # keep carrying new requests to it, and its drain would last as long as the load.)
    served = {r["served"] for b in done for r in b["results"]}
    assert served == {serving_default.name, other.name}, served
    told = [s.stdout + s.stderr for s in switched]
    assert not [t for t in told if "still in flight after" in t], told  # no drain ran out


def test_32_streams_naming_two_models_in_turn_through_the_routing_endpoint(
    serving_default, models, host
) -> None:
    names = [m.name for m in models.big][:2]
    url = _ways(host, models)["routing endpoint"]
    with sampling() as seen:
        done = finish(run_client({"bursts": [_burst(url, names, 4 * STREAMS)]}, None))
    failed = _failures(done)
    assert not failed, f"{len(failed)} of {4 * STREAMS} failed, e.g. {failed[:3]}"
    assert seen["samples"] > 10 and seen["max"] == 1, seen


def test_the_client_tells_a_stream_cut_short_from_a_whole_one() -> None:
    """The client's completeness check, so a truncated stream cannot pass as whole."""
    from tests.integration.clients.streams import complete_stream

    whole = b'data: {"choices":[{"finish_reason":null}]}\n\n' \
            b'data: {"choices":[{"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'  # fmt: skip
    assert complete_stream(whole) is None
    assert complete_stream(whole.rsplit(b"data: [DONE]", 1)[0]) == "truncated"
    assert complete_stream(b'data: {"choices":[{"finish_reason":null}]}\n\n') == "truncated"
    assert complete_stream(b'data: {"error": {}}\n\ndata: [DONE]\n\n') == "error-event"
    assert complete_stream(b'data: {"choices":[]}\n\ndata: [DONE]\n\n') == "no-finish-reason"
