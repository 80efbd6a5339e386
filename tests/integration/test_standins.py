"""The embedded default's models are stand-ins of the production catalog: the same names and
aliases as config/models.yaml, a tiny Qwen3 MoE and a tiny GPT-OSS written by llamavm with the
gguf package, served by the pinned llama-server on the code paths of the real models (MoE
experts, n_cpu_moe, the harmony chat template and its reasoning parser). Checked from the LAN
client, as a newcomer would after the README's first command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from llamavm import REPO_ROOT
from llamavm.inputs import catalog, vram
from tests.integration.helpers import client_curl, host_run, invoke

pytestmark = pytest.mark.testbed

SHARE = Path("/var/cache/llamavm/models")
TAGS = ("<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|return|>")


def _specs() -> dict[str, dict]:
    entries = yaml.safe_load((REPO_ROOT / "config" / "tiny-models.yaml").read_text())
    return {e["name"]: e for e in entries}


def _post(host: str, model: catalog.Model, path: str, body: dict) -> tuple[int, str]:
    answer = client_curl(
        f"http://{host}:{model.port}{path}",
        "-H", "Content-Type: application/json",
        "-d", json.dumps(body),
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    text, code = answer.stdout.rsplit("\n", 1)
    return int(code), text


def _chat(host: str, model: catalog.Model, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": "Hello, who are you?"}], **extra}
    code, text = _post(host, model, "/v1/chat/completions", body)
    assert code == 200, text
    return json.loads(text)["choices"][0]["message"]


def test_the_production_catalog_names_and_aliases_are_the_embedded_defaults(models) -> None:
    production = catalog.load(REPO_ROOT / "config" / "models.yaml")
    assert {m.name: set(m.aliases) for m in models.models} == {
        m.name: set(m.aliases) for m in production.models
    }
    assert models.default.name == production.default.name


@pytest.mark.parametrize("alias", ["qwen", "gpt-oss"])
def test_switch_by_the_production_alias_and_chat(provisioned, models, host, alias) -> None:
    result = invoke("switch", "--model", alias)
    assert result.returncode == 0, result.stdout + result.stderr
    model = models.resolve(alias)
    message = _chat(host, model)
    assert message["content"] == _specs()[model.name]["answer"]
    assert not any(tag in message["content"] for tag in TAGS)


def test_the_qwen_stand_in_is_a_qwen3_moe_and_the_gpt_oss_one_a_gpt_oss(models) -> None:
    archs = {}
    for model in models.models:
        info = vram.read_gguf(SHARE / model.gguf)
        archs[model.name] = info.architecture
        assert info.is_moe and info.expert_count > 1
    assert archs == {"qwen3-coder-30b": "qwen3moe", "gpt-oss-120b": "gpt-oss"}


def test_n_cpu_moe_keeps_experts_off_the_gpu_in_the_estimate(models) -> None:
    oss = models.resolve("gpt-oss")
    assert oss.n_cpu_moe == 1
    info = vram.read_gguf(SHARE / oss.gguf)
    on_gpu = vram.gpu_bytes(info, oss, 0)[0]
    all_on_gpu = vram.gpu_bytes(info, dataclasses.replace(oss, n_cpu_moe=0), 0)[0]
    assert on_gpu < all_on_gpu


def test_gpt_oss_reasoning_comes_apart_from_the_content(provisioned, models, host) -> None:
    assert invoke("switch", "--model", "gpt-oss").returncode == 0
    oss, spec = models.resolve("gpt-oss"), _specs()["gpt-oss-120b"]
    pid = host_run("systemctl show -p MainPID --value llamavm-model-gpt-oss-120b").stdout.strip()
    argv = host_run(f"tr '\\0' ' ' < /proc/{pid}/cmdline").stdout
    assert "--reasoning-effort medium" in argv and "--reasoning-format auto" in argv
    assert "--n-cpu-moe 1" in argv
    message = _chat(host, oss)
    assert message["reasoning_content"] == spec["reasoning"]
    assert message["content"] == spec["answer"]
    # streamed: reasoning deltas, then content deltas, never a channel tag
    answer = client_curl(
        f"http://{host}:{oss.port}/v1/chat/completions", "-N",
        "-H", "Content-Type: application/json",
        "-d", json.dumps({"stream": True, "messages": [{"role": "user", "content": "hi"}]}),
    )  # fmt: skip
    deltas = [
        json.loads(line[6:])["choices"][0]["delta"]
        for line in answer.stdout.splitlines()
        if line.startswith("data: {")
    ]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert (reasoning, content) == (spec["reasoning"], spec["answer"])


@pytest.mark.parametrize("effort", ["low", "high"])
def test_a_requests_reasoning_effort_reaches_the_chat_template(
    provisioned, models, host, effort
) -> None:
    assert invoke("switch", "--model", "gpt-oss").returncode == 0
    oss = models.resolve("gpt-oss")
    body = {"messages": [{"role": "user", "content": "hi"}]}
    code, text = _post(host, oss, "/apply-template", body)
    assert code == 200 and "Reasoning: medium" in json.loads(text)["prompt"], text
    code, text = _post(host, oss, "/apply-template", {**body, "reasoning_effort": effort})
    assert code == 200 and f"Reasoning: {effort}" in json.loads(text)["prompt"], text
    assert _chat(host, oss, reasoning_effort=effort)["content"] == _specs()[oss.name]["answer"]


def test_the_stand_ins_are_written_deterministically(tmp_path) -> None:
    from llamavm.artifacts import tinymodel

    entry = dict(_specs()["gpt-oss-120b"])
    entry.pop("file")
    spec = tinymodel.TinySpec(**entry)
    one = tinymodel.write(spec, tmp_path / "a.gguf")
    two = tinymodel.write(spec, tmp_path / "b.gguf")
    assert tinymodel.sha256(one) == tinymodel.sha256(two)
    shipped = SHARE / "tiny" / "gpt-oss-120b-tiny.gguf"
    assert tinymodel.sha256(one) == tinymodel.sha256(shipped)
