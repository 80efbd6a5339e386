"""Companions on the test bed (issue 24), from the LAN client's namespace: an embeddings
stand-in serves beside the big model (its own unit, outside the big models' Conflicts= chain),
/v1/embeddings on the routing endpoint answers from it while chats go to the big model, a
switch to a big model the companion does not fit beside stops it first and says why (and a
request for it gets a 503 naming the numbers), the switch back starts it again; a big model
drafts with a companion (speculative decoding: its answers report drafted tokens); a catalog
whose companions do not fit the GPU together is refused with one line naming the numbers, and
the serving model keeps serving. Exactly one big model at every sample."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import (
    TESTBED_CATALOG,
    active_units,
    client_curl,
    host_run,
    invoke,
    status,
)

pytestmark = pytest.mark.testbed

CONTROL = "http://{host}:8090"
FRONT_DOOR = "http://{host}:8443"
EMBED_PORT, DRAFT_PORT = 8011, 8012


def _variant(folder: Path, embed_mib: int = 600, draft_mib: int = 400) -> Path:
    """The test bed's catalog with two companions: `embed` (embeddings) and `qwen-draft` (the
    tiny Qwen3, which qwen drafts with); gpt-oss says it needs 31000 MiB, so embed does not
    fit beside it (31000 + 600 + reserve 1024 > 32607) and qwen-draft does."""
    data = yaml.safe_load(TESTBED_CATALOG.read_text())
    qwen, oss = data["models"]
    qwen["draft"] = "qwen-draft"
    oss["vram_mib"] = 31000
    data["models"] += [
        {"name": "embed", "description": "embeddings stand-in (the tiny Qwen3, mean pooling)",
         "companion": True, "task": "embeddings", "gguf": qwen["gguf"], "port": EMBED_PORT,
         "ctx_size": 512, "extra_args": ["--pooling", "mean"], "vram_mib": embed_mib},
        {"name": "qwen-draft", "description": "draft stand-in (the tiny Qwen3 itself)",
         "companion": True, "gguf": qwen["gguf"], "port": DRAFT_PORT, "ctx_size": 512,
         "vram_mib": draft_mib},
    ]  # fmt: skip
    path = folder / f"models.companions-{embed_mib}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def companions(provisioned, tmp_path_factory) -> Iterator[Path]:
    path = _variant(tmp_path_factory.mktemp("companions"))
    result = invoke("provision", "--catalog", str(path))
    try:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr
        switch = invoke("switch", "--model", "qwen", "--catalog", str(path))
        assert switch.returncode == 0, switch.stdout + switch.stderr
        yield path
    finally:
        back = invoke("provision")
        assert back.returncode == 0, back.stdout[-4000:] + back.stderr
        units = host_run("ls /etc/systemd/system | grep '^llamavm-companion-' || true").stdout
        assert units.strip() == "", units


def _post(url: str, body: dict) -> tuple[int, dict]:
    answer = client_curl(
        url, "-X", "POST", "-H", "Content-Type: application/json", "-d", json.dumps(body),
        timeout=120,
    )  # fmt: skip
    text, code = answer.stdout.rsplit("\n", 1)
    return int(code), json.loads(text) if text.strip() else {}


def _companion_states() -> dict[str, str]:
    return {c["name"]: c["state"] for c in status()["companions"]}


def test_an_embeddings_companion_answers_beside_the_big_model(companions, host) -> None:
    assert active_units() == ["llamavm-model-qwen3-coder-30b.service"]
    assert _companion_states() == {"embed": "active", "qwen-draft": "active"}
    # Its own port is open to the LAN while it runs beside the big model.
    assert client_curl(f"http://{host}:{EMBED_PORT}/health").stdout.endswith("200")
    results: dict[str, list] = {"chat": [], "embed": [], "units": []}

    def chats() -> None:
        for _ in range(4):
            results["chat"].append(
                _post(f"{CONTROL.format(host=host)}/v1/chat/completions",
                      {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
            )  # fmt: skip

    def embeddings() -> None:
        for i in range(4):
            results["embed"].append(
                _post(f"{CONTROL.format(host=host)}/v1/embeddings", {"input": f"line {i}"})
            )

    workers = [threading.Thread(target=chats), threading.Thread(target=embeddings)]
    for worker in workers:
        worker.start()
    while any(w.is_alive() for w in workers):
        results["units"].append(active_units())
    for worker in workers:
        worker.join()
    assert all(units == ["llamavm-model-qwen3-coder-30b.service"] for units in results["units"])
    for code, answer in results["chat"]:
        assert code == 200 and answer["model"] == "qwen3-coder-30b", answer
    for code, answer in results["embed"]:
        assert code == 200, answer
        vector = answer["data"][0]["embedding"]
        assert len(vector) > 8 and any(abs(x) > 0 for x in vector)
    # Naming the companion works the same; /v1/models lists it as one.
    code, named = _post(f"{CONTROL.format(host=host)}/v1/embeddings",
                        {"model": "embed", "input": "named"})  # fmt: skip
    assert code == 200 and named["data"], named
    listed = json.loads(client_curl(f"{CONTROL.format(host=host)}/v1/models").stdout.rsplit(
        "\n", 1)[0])  # fmt: skip
    entry = next(m for m in listed["data"] if m["id"] == "embed")
    assert entry["companion"] is True and entry["task"] == "embeddings"
    # The front door sends embeddings to the companion too (also under llama-server's other
    # name for the endpoint: the big model, started without --embeddings, would refuse it),
    # chats to the big model.
    code, answer = _post(f"{FRONT_DOOR.format(host=host)}/v1/embeddings", {"input": "front"})
    assert code == 200 and len(answer["data"][0]["embedding"]) > 8, answer
    code, answer = _post(f"{FRONT_DOOR.format(host=host)}/embeddings", {"content": "front"})
    assert code == 200 and answer, answer
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    code, answer = _post(f"{FRONT_DOOR.format(host=host)}/v1/chat/completions", chat)
    assert code == 200 and answer["model"] == "qwen3-coder-30b", answer


def test_a_switch_stops_and_starts_companions_as_the_admission_says(companions, host) -> None:
    away = invoke("switch", "--model", "gpt-oss", "--catalog", str(companions))
    assert away.returncode == 0, away.stdout + away.stderr
    said = away.stdout + away.stderr
    assert (
        "companion embed stops: it does not fit beside gpt-oss-120b (gpt-oss-120b 31000 MiB + "
        "embed 600 MiB + reserve 1024 MiB = 32624 MiB > budget 32607 MiB)" in said
    ), said
    assert active_units() == ["llamavm-model-gpt-oss-120b.service"]
    assert _companion_states() == {"embed": "inactive", "qwen-draft": "active"}
    code, refused = _post(f"{CONTROL.format(host=host)}/v1/embeddings", {"input": "x"})
    assert code == 503 and "32624 MiB > budget 32607 MiB" in refused["error"]["message"]
    assert client_curl(f"http://{host}:{EMBED_PORT}/health").returncode != 0  # closed, stopped
    front = client_curl(f"{FRONT_DOOR.format(host=host)}/v1/embeddings", "-X", "POST",
                        "-H", "Content-Type: application/json", "-d", '{"input": "x"}')  # fmt: skip
    said, code = front.stdout.rsplit("\n", 1)
    assert code == "503" and "embeddings companion embed is not running" in said, front.stdout
    back = invoke("switch", "--model", "qwen", "--catalog", str(companions))
    assert back.returncode == 0, back.stdout + back.stderr
    assert "companion(s) embed serve beside qwen3-coder-30b" in back.stdout + back.stderr
    assert _companion_states() == {"embed": "active", "qwen-draft": "active"}
    code, answer = _post(f"{CONTROL.format(host=host)}/v1/embeddings", {"input": "back"})
    assert code == 200 and answer["data"], answer
    code, answer = _post(f"{FRONT_DOOR.format(host=host)}/v1/embeddings", {"input": "back"})
    assert code == 200 and answer["data"], answer


def test_the_big_model_drafts_with_its_companion(companions, host) -> None:
    args = host_run("ps -o args= -C llama-server").stdout
    mine = next(line for line in args.splitlines() if "--alias qwen3-coder-30b" in line)
    assert "--model-draft /srv/models/tiny/" in mine and "--spec-type draft-simple" in mine
    code, answer = _post(f"http://{host}:8001/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24,
                          "temperature": 0})  # fmt: skip
    assert code == 200, answer
    assert answer["timings"].get("draft_n", 0) > 0, answer["timings"]


def test_companions_that_do_not_fit_together_are_refused_and_nothing_stops(
    companions, host, tmp_path
) -> None:
    before = host_run("systemctl show -p MainPID --value llamavm-model-qwen3-coder-30b").stdout
    too_big = _variant(tmp_path, embed_mib=20000, draft_mib=12000)
    result = invoke("provision", "--catalog", str(too_big))
    assert result.returncode == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert (
        "companions: embed 20000 MiB + qwen-draft 12000 MiB + reserve 1024 MiB = 33024 MiB > "
        "budget 32607 MiB" in line
    ), line
    models = invoke("models", "--catalog", str(too_big))
    assert models.returncode == 2 and "33024 MiB > budget 32607 MiB" in models.stderr
    after = host_run("systemctl show -p MainPID --value llamavm-model-qwen3-coder-30b").stdout
    assert after == before
    assert client_curl(f"http://{host}:8001/health").stdout.endswith("200")
