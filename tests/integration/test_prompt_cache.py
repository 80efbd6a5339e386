"""Prompt caches across a switch on the test bed (issue 24), from the LAN client's namespace: a
long prompt to the default model, a switch away and back, the same prompt again — llama-server
processes a fraction of its tokens the second time (the slots saved before the stop were
restored after the start), the answer is the same, and the saved slots live in the model's own
0700 directory, owned by the service user. bench/prompt_cache.py measures it."""

from __future__ import annotations

import json

import pytest

from tests.integration.helpers import client_curl, host_run, invoke, status, url

pytestmark = pytest.mark.testbed

WORDS = ["the", "operator", "reads", "the", "build", "log", "line", "by", "line", "and",
         "notes", "each", "warning"]  # fmt: skip


def _chat(address: str, prompt: str) -> tuple[dict, str]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
            "temperature": 0}  # fmt: skip
    answer = client_curl(
        address, "-X", "POST", "-H", "Content-Type: application/json", "-d", json.dumps(body),
        timeout=120,
    )  # fmt: skip
    text, code = answer.stdout.rsplit("\n", 1)
    assert code == "200", text
    reply = json.loads(text)
    return reply["timings"], reply["choices"][0]["message"]["content"]


def test_a_long_prompt_is_not_processed_again_after_a_switch_away_and_back(
    provisioned, models, host
) -> None:
    serving_default = models.default
    start = invoke("switch", "--model", serving_default.name)
    assert start.returncode == 0, start.stdout + start.stderr
    other = next(m for m in models.models if m.name != serving_default.name)
    address = url(host, serving_default, "/v1/chat/completions")
    prompt = "Summarise: " + " ".join(WORDS[i % len(WORDS)] for i in range(500))
    first, answer = _chat(address, prompt)
    assert first["prompt_n"] > 400, first
    away = invoke("switch", "--model", other.name)
    assert away.returncode == 0, away.stdout + away.stderr
    assert "prompt cache: saved" in away.stdout + away.stderr
    slot_dir = f"/var/cache/llamavm/slots/{serving_default.name}"
    listing = host_run(f"stat -c '%U %a' {slot_dir} && ls {slot_dir}").stdout.split()
    assert listing[:2] == ["llama", "700"], listing
    assert any(name.startswith("slot-") for name in listing[2:]), listing
    kept = next(m for m in status()["models"] if m["name"] == serving_default.name)
    assert kept["prompt_cache"] and sum(kept["prompt_cache"].values()) >= first["prompt_n"]
    back = invoke("switch", "--model", serving_default.name)
    assert back.returncode == 0, back.stdout + back.stderr
    assert "prompt cache: restored" in back.stdout + back.stderr
    again, answer_again = _chat(address, prompt)
    assert answer_again == answer
    assert again["prompt_n"] <= 0.2 * first["prompt_n"], (first, again)
