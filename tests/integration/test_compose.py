"""The catalog as a Compose project on a real engine (issues 25 and 36; marker `compose`: it
builds llama.cpp into an image, minutes): Debian's docker.io started by the test, the base
image made from the test bed's Debian rootfs. `invoke provision -i local-compose` renders,
builds and serves the default CPU stand-in; the LAN client reaches it on the controller's LAN
address. Every change of what serves is the host package's transaction, run by the project's
switchd container: the switch moves the model, rolls back from a broken one, two at once leave
one container serving, one whose CLI is killed finishes by itself, one whose own process is
killed is recovered, an engine restart mid-switch ends with a model serving, a killed serving
container is replaced; `MODEL=... docker-compose up -d` in the rendered folder switches
through the same transaction; a container started by hand beside the serving one refuses to
load."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamavm import REPO_ROOT
from llamavm.artifacts import tinymodel
from llamavm.inputs import catalog
from llamavm.platforms.compose.engine import Engine
from llamavm.platforms.compose.render import LABEL
from llamavm.testbed import docker as engine_mod
from tests.integration.helpers import (
    CONTROL_ENDPOINTS,
    INVOKE,
    SHARE,
    client_curl,
    http_code,
    invoke,
    lan_chat,
    sampled,
    wait_for,
)
from tests.integration.helpers import (
    api_call as _call,
)
from tests.integration.helpers import (
    api_post as _post,
)

pytestmark = [pytest.mark.testbed, pytest.mark.compose]

INVENTORY = engine_mod.INVENTORY
ADDRESS = engine_mod.ADDRESS
SWITCHD = "llamavm-switchd"
#: The engine this module started (a restart replaces it), stopped at the end.
STARTED: dict[str, Any] = {}


def _remove_the_project() -> None:
    """The project's containers and volumes gone: the suite starts, and leaves, as a new
    project does."""
    left = engine_mod.docker("ps", "-aq", "--filter", "label=com.docker.compose.project="
                             "llamavm", check=False).stdout.split()  # fmt: skip
    if left:
        engine_mod.docker("rm", "-f", *left, check=False)
    volumes = engine_mod.docker("volume", "ls", "-q", "--filter", "label=com.docker.compose."
                                "project=llamavm", check=False).stdout.split()  # fmt: skip
    if volumes:
        engine_mod.docker("volume", "rm", *volumes, check=False)


@pytest.fixture(scope="module")
def engine(testbed_info) -> Iterator[Engine]:
    why = engine_mod.available()
    if why:
        pytest.skip(why)
    engine_mod.install()
    STARTED["proc"] = engine_mod.start()
    _remove_the_project()
    try:
        yield engine_mod.project(INVENTORY, ADDRESS)[0]
    finally:
        _remove_the_project()
        engine_mod.stop(STARTED.get("proc"))


@pytest.fixture(scope="module")
def provisioned_compose(engine: Engine) -> tuple[Engine, object]:
    result = invoke("provision", "-i", INVENTORY, timeout=3600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return engine, result


def chat(model: catalog.Model) -> tuple[str, dict]:
    code, body = lan_chat(f"http://{ADDRESS}:{model.port}")
    return code, json.loads(body) if code == "200" else {"body": body}


def serving(engine: Engine) -> list[str]:
    return [n for n, c in engine.containers().items() if c.status == "running" and c.kind == "big"]


def in_switchd(command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = engine_mod.docker("exec", SWITCHD, "sh", "-c", command, check=False)
    assert done.returncode == 0 or not check, done.stderr
    return done


def set_failpoints(points: dict[str, Any]) -> None:
    body = json.dumps(points).replace("'", "")
    in_switchd(f"umask 077 && echo '{body}' > /run/llamavm/failpoints.json")


def clear_failpoints() -> None:
    in_switchd("rm -f /run/llamavm/failpoints.json /run/llamavm/reached", check=False)


def one_serves(engine: Engine, models) -> str:
    """Exactly one big model's container runs and answers a chat from the LAN: its name."""
    now = serving(engine)
    assert len(now) == 1, now
    assert chat(models.resolve(now[0]))[0] == "200"
    return now[0]


def compose_cli(engine: Engine, *args: str, model: str | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """The Docker user's own command in the rendered folder: no invoke, no -p, no -f."""
    env = {k: v for k, v in engine.env.items() if k != "MODEL"}
    if model is not None:
        env["MODEL"] = model
    return subprocess.run([*engine.compose_cli(), *args], cwd=engine.dir, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


def test_provision_builds_the_image_and_serves_the_lan(provisioned_compose, models) -> None:
    engine, result = provisioned_compose
    assert f"started {models.default.name}" in result.stdout or "up to date" in result.stdout
    assert serving(engine) == [models.default.name]
    code, answer = chat(models.default)
    assert code == "200", answer
    assert answer["choices"][0]["message"]["role"] == "assistant"
    page = client_curl(f"http://{ADDRESS}:{models.default.port}/", "--compressed")
    assert page.stdout.rsplit("\n", 1)[-1] == "200" and "<html" in page.stdout.lower()
    box = engine.run([engine.cli, "inspect", f"llamavm-{models.default.name}"]).stdout
    config = json.loads(box)[0]
    assert config["Config"]["User"] == "10001:10001" and config["HostConfig"]["ReadonlyRootfs"]
    mounts = {m["Destination"]: m for m in config["Mounts"]}
    assert mounts["/models"]["RW"] is False
    again = invoke("provision", "-i", INVENTORY)
    assert again.returncode == 0 and "compose: up to date, no changes" in again.stdout, again.stdout


def test_the_host_runtime_sees_the_projects_containers_through_the_engine_api(
    provisioned_compose, models
) -> None:
    """The runtime seam's Compose side (llamavm.host.runtime.ComposeRuntime) on the real
    engine's socket: what serves, in systemd's words, its logs and its counters."""
    from dataclasses import replace

    from llamavm.host.engine import EngineApi
    from llamavm.host.runtime import ComposeRuntime

    runtime = ComposeRuntime(EngineApi(str(engine_mod.SOCKET)), f"{LABEL}.model")
    big = [replace(m, unit=f"llamavm-{m.name}") for m in _host_models(models)]
    states = runtime.states(big)
    assert states[f"llamavm-{models.default.name}"] == "active", states
    assert [u for u, s in states.items() if s == "active"] == [f"llamavm-{models.default.name}"]
    serving_one = next(m for m in big if m.name == models.default.name)
    look = runtime.look(serving_one)
    assert (look.active, look.sub) == ("active", "running") and look.pid > 0 and look.invocation
    assert runtime.counters(serving_one, look.pid)[0] > 0  # CPU the server has used
    assert runtime.logs(serving_one, 50).strip()  # llama-server's own lines, frames stripped


def _host_models(models):
    """The catalog's big models as the host package sees them (a unit each)."""
    from llamavm.host.contract import Model as HostModel

    return [
        HostModel(name=m.name, aliases=tuple(m.aliases), unit=m.unit, port=m.port,
                  gguf=Path("/models") / m.gguf, base_url=f"http://{ADDRESS}:{m.port}",
                  health_url=f"http://{ADDRESS}:{m.port}/health", ctx_size=m.ctx_size,
                  parallel=m.parallel, health_timeout_s=m.health_timeout_s, size_bytes=None,
                  sha256=None, vram={})
        for m in models.big
    ]  # fmt: skip


def test_switch_moves_the_model_and_status_agrees(provisioned_compose, models) -> None:
    engine, _ = provisioned_compose
    other = next(m for m in models.big if m != models.default)
    moved = invoke("switch", "-i", INVENTORY, "--model", other.name)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert f"{other.name} serving at http://{ADDRESS}:{other.port}/" in moved.stdout
    assert serving(engine) == [other.name]
    assert chat(other)[0] == "200"
    assert http_code(f"http://{ADDRESS}:{models.default.port}/health") is None
    shown = invoke("status", "-i", INVENTORY, "--json")
    assert shown.returncode == 0, shown.stderr
    answer = json.loads(shown.stdout)["compose"]
    assert answer["running"] == [other.name]
    # The host's answer, keys and all: switchd runs the host package's own status.
    assert answer["active"] == other.name and answer["desired"] == other.name
    health = {m["name"]: m.get("health") for m in answer["models"]}
    assert health[other.name] == 200 and health[models.default.name] is None
    units = {m["name"]: m["unit"] for m in answer["models"]}
    assert units[other.name] == f"llamavm-{other.name}"
    again = invoke("switch", "-i", INVENTORY, "--model", other.name)
    assert again.returncode == 0 and "already serving" in again.stdout


WORDS = ["the", "operator", "reads", "the", "build", "log", "line", "by", "line", "and",
         "notes", "each", "warning"]  # fmt: skip


def test_metrics_for_prometheus_follow_the_serving_model(provisioned_compose, models) -> None:
    """node_exporter on the node_exporter port, from the LAN: llamavm's series (switchd writes
    them) say which model serves and that it is healthy, and follow a switch; the transactions
    are counted; no GPU here, and the series says so; node_exporter's own series too."""
    engine, _ = provisioned_compose
    url = f"http://{ADDRESS}:{models.settings.reserved_ports['node_exporter']}/metrics"

    def scrape() -> str:
        text, code = client_curl(url).stdout.rsplit("\n", 1)
        return text if code == "200" else ""

    def says(name: str) -> bool:
        return f'llamavm_model_active{{model="{name}"}} 1' in scrape()

    now = one_serves(engine, models)
    other = next(m.name for m in models.big if m.name != now)
    for name in (other, now):
        moved = invoke("switch", "-i", INVENTORY, "--model", name)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        wait_for(lambda name=name: says(name), 60, f"the metrics to say {name} serves", 1)
    text = scrape()
    assert f'llamavm_model_healthy{{model="{now}"}} 1' in text
    assert f'llamavm_model_active{{model="{other}"}} 0' in text
    assert 'llamavm_transactions_total{op="switch",result="ok"}' in text
    assert "llamavm_gpu_up 0" in text and "node_cpu_seconds_total" in text


def _long_chat(model: catalog.Model, prompt: str) -> tuple[dict, str]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
            "temperature": 0}  # fmt: skip
    answer = client_curl(f"http://{ADDRESS}:{model.port}/v1/chat/completions", "-X", "POST",
                         "-H", "Content-Type: application/json", "-d", json.dumps(body),
                         timeout=120)  # fmt: skip
    text, code = answer.stdout.rsplit("\n", 1)
    assert code == "200", text
    reply = json.loads(text)
    return reply["timings"], reply["choices"][0]["message"]["content"]


def test_a_long_prompt_is_not_processed_again_after_a_switch_away_and_back(
    provisioned_compose, models
) -> None:
    """Prompt caches across a switch on Compose: the slots saved on the project's slots volume
    before the stop, restored after the start — the same answer, a fraction of the tokens."""
    first = models.default
    other = next(m for m in models.big if m != first)
    assert invoke("switch", "-i", INVENTORY, "--model", first.name).returncode == 0
    prompt = "Summarise: " + " ".join(WORDS[i % len(WORDS)] for i in range(500))
    before, answer = _long_chat(first, prompt)
    assert before["prompt_n"] > 400, before
    away = invoke("switch", "-i", INVENTORY, "--model", other.name)
    assert away.returncode == 0 and "prompt cache: saved" in away.stdout + away.stderr, away
    listing = engine_mod.docker("run", "--rm", "-v", "llamavm_slots:/slots", "--entrypoint",
                                "sh", engine_mod.BASE, "-c", f"stat -c '%u %a' /slots/{first.name}"
                                f" && ls /slots/{first.name}").stdout.split()  # fmt: skip
    assert listing[:2] == ["10001", "700"], listing
    assert any(name.startswith("slot-") for name in listing[2:]), listing
    status = json.loads(invoke("status", "-i", INVENTORY, "--json").stdout)["compose"]
    kept = next(m for m in status["models"] if m["name"] == first.name)
    assert kept["prompt_cache"] and sum(kept["prompt_cache"].values()) >= before["prompt_n"]
    back = invoke("switch", "-i", INVENTORY, "--model", first.name)
    assert back.returncode == 0 and "prompt cache: restored" in back.stdout + back.stderr, back
    again, answer_again = _long_chat(first, prompt)
    assert answer_again == answer
    assert again["prompt_n"] <= 0.2 * before["prompt_n"], (before, again)


def test_a_container_started_by_hand_beside_it_refuses_to_load(provisioned_compose, models) -> None:
    engine, _ = provisioned_compose
    before = serving(engine)
    assert len(before) == 1
    rogue = next(m for m in models.big if m.name not in before)
    engine.compose([rogue.name], ["up", "-d", "--no-deps", "--no-build", rogue.name])
    engine.run([engine.cli, "wait", f"llamavm-{rogue.name}"], timeout=120)
    said = engine.logs(rogue.name)
    assert f"not starting {rogue.name}" in said and "invoke switch" in said, said
    found = engine.containers()[rogue.name]
    assert (found.status, found.exit_code) == ("exited", 0)  # not restarted in a loop
    assert serving(engine) == before
    assert chat(models.resolve(before[0]))[0] == "200"


@pytest.fixture
def broken_catalog(provisioned_compose, tmp_path: Path) -> Iterator[Path]:
    """The catalog plus a model whose file is no GGUF ('corrupt') and one whose server crashes
    while loading ('broken'), rendered into the project; the project as it was afterwards."""
    corrupt = SHARE / "tiny" / "llamavm-compose-corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 64)
    broken = SHARE / "tiny" / "llamavm-compose-broken.gguf"
    tinymodel.write(tinymodel.TinySpec("crash-loop", arch="llamavm-broken"), broken)
    inv_catalog = REPO_ROOT / "config" / "models.testbed.yaml"
    raw = yaml.safe_load(inv_catalog.read_text())
    raw["models"] += [
        {"name": "corrupt", "gguf": "tiny/llamavm-compose-corrupt.gguf", "port": 8039,
         "ctx_size": 512, "health_timeout_s": 30},
        {"name": "broken", "gguf": "tiny/llamavm-compose-broken.gguf", "port": 8038,
         "ctx_size": 512, "health_timeout_s": 600},
    ]  # fmt: skip
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        done = invoke("provision", "-i", INVENTORY, "--catalog", str(path))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield path
    finally:
        corrupt.unlink()
        broken.unlink()
        assert invoke("provision", "-i", INVENTORY).returncode == 0


def test_a_broken_model_rolls_back(provisioned_compose, models, broken_catalog: Path) -> None:
    engine, _ = provisioned_compose
    before = serving(engine)
    refused = invoke("switch", "-i", INVENTORY, "--catalog", str(broken_catalog), "--model",
                     "corrupt")  # fmt: skip
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "is corrupt" in refused.stderr.strip().splitlines()[-1]
    assert serving(engine) == before  # refused before anything was stopped
    began = time.monotonic()
    broken = invoke("switch", "-i", INVENTORY, "--catalog", str(broken_catalog), "--model",
                    "broken")  # fmt: skip
    took = time.monotonic() - began
    assert broken.returncode == 1, broken.stdout + broken.stderr
    last = broken.stderr.strip().splitlines()[-1]
    assert "broken: " in last and f"{before[0]} is serving again" in last, last
    assert took < 120, f"took {took:.0f}s: the switch waited for its 600 s health timeout"
    assert serving(engine) == before
    assert chat(models.resolve(before[0]))[0] == "200"


def test_model_env_with_docker_compose_up_switches_through_the_transaction(
    provisioned_compose, models, broken_catalog: Path
) -> None:
    """`MODEL=x docker-compose up -d` in the rendered folder: x serves, the one before is gone;
    a broken x leaves the one before serving; an unknown x changes nothing."""
    engine, _ = provisioned_compose
    first, second = models.big[0], models.big[1]
    for model in (first, second):
        done = compose_cli(engine, "up", "-d", model=model.name)
        assert done.returncode == 0, done.stderr
        wait_for(lambda m=model: serving(engine) == [m.name] and chat(m)[0] == "200", 120,
                 f"MODEL={model.name} to serve")  # fmt: skip
    line = f"{second.name} serves on port {second.port}"  # `docker compose logs` says so
    wait_for(lambda: line in compose_cli(engine, "logs", "--no-color", "switchd").stdout, 60,
             "switchd to log what serves")  # fmt: skip
    for bad in ("broken", "no-such-model"):
        done = compose_cli(engine, "up", "-d", model=bad)
        assert done.returncode == 0, done.stderr
        expected = "is serving again" if bad == "broken" else f"MODEL={bad}: no model named"
        wait_for(lambda e=expected: e in engine_mod.docker("logs", SWITCHD, check=False).stdout,
                 120, f"switchd to say {expected!r}")  # fmt: skip
        assert one_serves(engine, models) == second.name
    assert compose_cli(engine, "up", "-d", model="").returncode == 0


def test_the_switchs_own_process_killed_after_the_stop_is_recovered(
    provisioned_compose, models
) -> None:
    """The transaction's process SIGKILLs itself right after the old container stopped: its
    supervisor recovers it (the old model serves again) and the CLI says how it ended."""
    engine, _ = provisioned_compose
    assert invoke("switch", "-i", INVENTORY, "--model", models.default.name).returncode == 0
    other = next(m for m in models.big if m != models.default)
    set_failpoints({"after_stop": {"kill": True}})
    try:
        result = invoke("switch", "-i", INVENTORY, "--model", other.name)
    finally:
        clear_failpoints()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "its process was killed" in result.stderr and "rolled back" in result.stderr
    assert one_serves(engine, models) == models.default.name


def _switch_held_after_the_stop(models) -> tuple[subprocess.Popen[str], catalog.Model]:
    """`invoke switch` from the default to the other model, held for 60 s right after the old
    container stopped (a failpoint): the CLI's process, once the transaction is there, and the
    target."""
    assert invoke("switch", "-i", INVENTORY, "--model", models.default.name).returncode == 0
    other = next(m for m in models.big if m != models.default)
    set_failpoints({"after_stop": {"mark": "/run/llamavm/reached", "sleep": 60}})
    cli = subprocess.Popen([str(INVOKE), "switch", "-i", INVENTORY, "--model", other.name],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=REPO_ROOT)  # fmt: skip
    wait_for(lambda: in_switchd("test -e /run/llamavm/reached", check=False).returncode == 0,
             60, "the transaction to stop the old model")  # fmt: skip
    return cli, other


def test_a_transaction_killed_with_its_supervisor_is_recovered_by_switchd(
    provisioned_compose, models
) -> None:
    """Every process of the transaction killed after the stop (no supervisor left to recover
    it): switchd finds the pending transaction with the lock free and recovers it."""
    engine, _ = provisioned_compose
    cli, other = _switch_held_after_the_stop(models)
    try:
        in_switchd("pkill -KILL -f 'llamavm-switch (supervise|run) '")
        out, err = cli.communicate(timeout=240)
    finally:
        cli.kill()
        clear_failpoints()
    assert cli.returncode in (0, 1), out + err
    wait_for(lambda: len(serving(engine)) == 1, 60, "a model to serve again")
    assert one_serves(engine, models) in (models.default.name, other.name)
    status = json.loads(invoke("status", "-i", INVENTORY, "--json").stdout)["compose"]
    assert status["transaction"] is None


def test_an_engine_restart_mid_switch_ends_with_a_model_serving(
    provisioned_compose, models
) -> None:
    engine, _ = provisioned_compose
    cli, other = _switch_held_after_the_stop(models)
    try:
        STARTED["proc"] = engine_mod.restart() or STARTED.get("proc")
        out, err = cli.communicate(timeout=400)
    finally:
        cli.kill()
    assert cli.returncode in (0, 1, 5), out + err
    wait_for(lambda: len(serving(engine)) == 1 and chat(models.resolve(serving(engine)[0]))[0]
             == "200", 180, "a model to serve after the engine's restart")  # fmt: skip
    assert one_serves(engine, models) in (models.default.name, other.name)


def test_a_killed_serving_container_is_replaced(provisioned_compose, models) -> None:
    engine, _ = provisioned_compose
    before = one_serves(engine, models)
    engine_mod.docker("kill", f"llamavm-{before}")
    wait_for(lambda: serving(engine) == [before] and chat(models.resolve(before))[0] == "200",
             90, "the killed model to serve again")  # fmt: skip


def test_two_switches_at_once_leave_exactly_one_serving(provisioned_compose, models) -> None:
    engine, _ = provisioned_compose
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def go(name: str) -> None:
        results[name] = invoke("switch", "-i", INVENTORY, "--model", name)

    threads = [threading.Thread(target=go, args=(m.name,)) for m in models.big]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.returncode == 0 for r in results.values()), {
        n: r.stdout + r.stderr for n, r in results.items()
    }
    now = serving(engine)
    assert len(now) == 1
    assert chat(models.resolve(now[0]))[0] == "200"


def test_stop_leaves_nothing_and_provision_keeps_it_stopped(provisioned_compose) -> None:
    engine, _ = provisioned_compose
    stopped = invoke("stop", "-i", INVENTORY)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert serving(engine) == []
    again = invoke("provision", "-i", INVENTORY)
    assert again.returncode == 0 and serving(engine) == []
    assert "left stopped" in again.stdout


def test_a_killed_cli_leaves_the_switch_to_finish(provisioned_compose, models) -> None:
    engine, _ = provisioned_compose
    assert invoke("switch", "-i", INVENTORY, "--model", models.default.name).returncode == 0
    target = next(m for m in models.big if m != models.default)
    cli = subprocess.Popen([str(INVOKE), "switch", "-i", INVENTORY, "--model", target.name],
                           stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)  # fmt: skip
    assert cli.stdout is not None and "switching to" in cli.stdout.readline()
    time.sleep(0.2)  # the transaction's own process has started
    cli.kill()
    cli.wait(timeout=10)
    wait_for(lambda: serving(engine) == [target.name] and chat(target)[0] == "200", 90,
             "the switch to finish without its CLI")  # fmt: skip


def test_a_model_whose_container_cannot_start_rolls_back(provisioned_compose, models) -> None:
    """The engine refuses the new container (its port is taken on the host): the old model is
    started again and the CLI says so in one line."""
    engine, _ = provisioned_compose
    assert invoke("switch", "-i", INVENTORY, "--model", models.default.name).returncode == 0
    other = next(m for m in models.big if m != models.default)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((ADDRESS, other.port))
        squatter.listen()
        refused = invoke("switch", "-i", INVENTORY, "--model", other.name)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    # The host transaction's words: the engine's start failed, and the roll back.
    assert "start failed" in last and f"{models.default.name} is serving again" in last, last
    assert serving(engine) == [models.default.name]
    assert chat(models.default)[0] == "200"


def test_an_embeddings_companion_serves_beside_the_big_model(
    provisioned_compose, models, tmp_path: Path
) -> None:
    """A companion (the tiny Qwen3 with mean pooling) started by the switch beside the big
    model as the VRAM admission says; /v1/embeddings answers from it, on its port, through
    the control service's routing and through the front door, while chats go to the big
    model."""
    engine, _ = provisioned_compose
    raw = yaml.safe_load((REPO_ROOT / "config" / "models.testbed.yaml").read_text())
    qwen = raw["models"][0]
    raw["models"].append({"name": "embed", "companion": True, "task": "embeddings",
                          "gguf": qwen["gguf"], "port": 8011, "ctx_size": 512,
                          "extra_args": ["--pooling", "mean"], "vram_mib": 600})  # fmt: skip
    path = tmp_path / "models.companion.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        done = invoke("provision", "-i", INVENTORY, "--catalog", str(path))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        moved = invoke("switch", "-i", INVENTORY, "--catalog", str(path), "--model",
                       models.default.name)  # fmt: skip
        assert moved.returncode == 0, moved.stdout + moved.stderr
        wait_for(lambda: engine.containers().get("embed") is not None
                 and engine.containers()["embed"].status == "running"
                 and http_code(f"http://{ADDRESS}:8011/health") == 200, 60,
                 "the companion to serve")  # fmt: skip
        body = json.dumps({"input": "the operator reads the build log"})
        control = raw["settings"]["control"]["port"]
        front = f"http://{ADDRESS}:{raw['settings']['reserved_ports']['proxy']}"
        for base in (f"http://{ADDRESS}:8011", f"http://{ADDRESS}:{control}", front):
            answer = client_curl(f"{base}/v1/embeddings", "-X", "POST", "-H",
                                 "Content-Type: application/json", "-d", body)  # fmt: skip
            text, code = answer.stdout.rsplit("\n", 1)
            assert code == "200", (base, text)
            assert len(json.loads(text)["data"][0]["embedding"]) > 8
        assert one_serves(engine, models) == models.default.name  # the big one still alone
        status = json.loads(invoke("status", "-i", INVENTORY, "--catalog", str(path),
                                   "--json").stdout)["compose"]  # fmt: skip
        beside = {c["name"]: c for c in status["companions"]}
        assert beside["embed"]["admitted"] and beside["embed"]["health"] == 200
    finally:
        assert invoke("provision", "-i", INVENTORY).returncode == 0
    assert "embed" not in engine.containers()  # gone with the catalog entry


# --- the control service on Compose (last: the project runs keyed from here on) ---------------


@pytest.fixture(scope="module")
def keyed_compose(provisioned_compose, tmp_path_factory) -> Iterator[tuple[Any, str, str]]:
    """The project with the key policy on (catalog, key, control base URL); as before after."""
    from tests.integration.helpers import keyed_catalog_file

    engine, _ = provisioned_compose
    path = keyed_catalog_file(tmp_path_factory.mktemp("keyed-compose"))
    done = invoke("provision", "-i", INVENTORY, "--catalog", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cat = catalog.load(path)
    key = (engine.dir / "secrets" / "api-key").read_text().strip()
    assert len(key) >= 32
    base = f"http://{ADDRESS}:{cat.settings.control.port}"
    wait_for(lambda: http_code(f"{base}/health") == 200, 60, "the control service to answer")
    try:
        yield cat, key, base
    finally:
        assert invoke("provision", "-i", INVENTORY).returncode == 0


def _front_door(cat: catalog.Catalog) -> str:
    assert cat.settings.expose.front_door.enabled, "the test bed's catalog has the front door"
    return f"http://{ADDRESS}:{cat.settings.reserved_ports['proxy']}"


def _active(base: str, key: str) -> str | None:
    code, body = _call(f"{base}/status", key)
    assert code == 200, body
    return json.loads(body)["active"]


def _containers_serving() -> int:
    done = engine_mod.docker("ps", "-q", "--filter", f"label={LABEL}.kind=big", "--filter",
                             "status=running", check=False)  # fmt: skip
    return len(done.stdout.split())


def test_the_control_service_wants_the_key_and_works_with_it(keyed_compose, models) -> None:
    _, key, base = keyed_compose
    for method, path, body in CONTROL_ENDPOINTS:
        for given in (None, "not-the-key"):
            code = (_call(base + path, given) if method == "GET" else _post(base + path, given,
                                                                            body))[0]  # fmt: skip
            assert code == 401, (path, given)
        code, answer = _call(base + path, key) if method == "GET" else _post(base + path, key, body)
        assert code == 200, (path, answer)
    assert _active(base, key) is None and _containers_serving() == 0  # the last was /stop
    for path in ("/health", "/"):  # public by design, as on a host
        assert http_code(base + path) == 200, path
    code, _ = _post(f"{base}/switch", key, {"model": models.default.name})
    assert code == 200 and _active(base, key) == models.default.name
    port = f"http://{ADDRESS}:{models.default.port}/v1/models"
    assert _call(port, None)[0] == 401 and _call(port, key)[0] == 200  # the model's own port
    door = f"{_front_door(models)}/v1/models"
    for given in (None, "not-the-key"):
        assert _call(door, given)[0] == 401, given
    code, listed = _call(door, key)
    assert code == 200 and json.loads(listed)["data"], listed
    assert http_code(f"{_front_door(models)}/") == 200  # the web UI's page, public as on a host


def test_a_bad_control_request_harms_nothing(keyed_compose, models) -> None:
    _, key, base = keyed_compose
    before = _active(base, key)
    assert before is not None
    assert _post(f"{base}/switch", key, {"model": "no-such-model"})[0] == 404
    assert _post(f"{base}/switch", key, {"model": "../../etc/passwd"})[0] == 404
    assert _post(f"{base}/switch", key, {"model": ["qwen"]})[0] == 422
    assert _call(f"{base}/switch", key, "-X", "POST", "-d", "{not json")[0] == 422
    huge = Path("/tmp/llamavm-compose-huge.json")  # 4 MiB: more than a command line holds
    huge.write_text(json.dumps({"model": "q" * (4 << 20)}))
    try:
        code, _ = _call(f"{base}/switch", key, "-X", "POST", "-H",
                        "Content-Type: application/json", "--data-binary", f"@{huge}")  # fmt: skip
    finally:
        huge.unlink()
    assert 400 <= code < 500, code
    assert _active(base, key) == before and http_code(f"{base}/health") == 200
    assert chat(models.resolve(before))[0] in ("200", "401")  # keyed: the model port wants it


def test_an_sse_switch_completes_after_its_client_hangs_up(keyed_compose, models) -> None:
    _, key, base = keyed_compose
    before = _active(base, key)
    target = next(m for m in models.big if m.name != before)
    ns = config_ns()
    argv = ["ip", "netns", "exec", ns, "curl", "-sS", "-N", "-X", "POST", "-H",
            f"Authorization: Bearer {key}", "-H", "Content-Type: application/json", "-d",
            json.dumps({"model": target.name}), f"{base}/switch?stream=true"]  # fmt: skip
    sse = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert sse.stdout is not None and sse.stdout.readline().startswith("event: progress")
    sse.kill()  # the client goes away mid-switch
    sse.wait()
    wait_for(lambda: _active(base, key) == target.name, 120, "the switch to finish alone")
    assert _containers_serving() == 1


def config_ns() -> str:
    from llamavm.testbed import config

    return config.load_config().lan.ns_client


def test_the_openai_client_is_routed_across_two_models_one_container_at_a_time(
    keyed_compose,
) -> None:
    _, key, base = keyed_compose
    here = Path(__file__).resolve().parent
    with sampled(_containers_serving) as samples:
        run = subprocess.run(
            ["ip", "netns", "exec", config_ns(), sys.executable,
             str(here / "clients" / "routing.py"), f"{base}/v1", "two", "qwen", "gpt-oss"],
            capture_output=True, text=True, timeout=900, check=False,
            env={**os.environ, "LLAMAVM_KEY": key},
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    answers = {e["name"]: e for e in yaml.safe_load((REPO_ROOT / "config" /
                                                     "tiny-models.yaml").read_text())}  # fmt: skip
    qwen, oss = result["answers"]
    assert qwen["content"] == answers["qwen3-coder-30b"]["answer"]
    assert oss["content"] == answers["gpt-oss-120b"]["answer"]
    assert samples and max(samples) <= 1, samples
    assert _active(base, key) == "gpt-oss-120b"


def test_streams_through_the_front_door_wait_through_two_switches(keyed_compose) -> None:
    """32 keyed streams at once through the front door while `invoke switch` moves the model
    and back: every request answered 200 and whole; at most one model container at a time."""
    from tests.integration.load import finish, run_client

    cat, key, base = keyed_compose
    before = _active(base, key)
    assert before is not None
    other = next(m for m in cat.big if m.name != before)
    burst = {"target": "front", "url": _front_door(cat), "requests": 256, "concurrency": 32,
             "stream": True, "models": [before], "max_tokens": 16}  # fmt: skip
    with sampled(_containers_serving) as samples:
        client = run_client({"bursts": [burst]}, key)
        switched = [invoke("switch", "-i", INVENTORY, "--catalog", str(cat.path), "--model", m)
                    for m in (other.name, before)]  # fmt: skip
        done = finish(client)
    assert [s.returncode for s in switched] == [0, 0], [s.stdout + s.stderr for s in switched]
    failed = [r for b in done for r in b["results"] if not r["ok"]]
    assert not failed, f"{len(failed)} of 256 failed, e.g. {failed[:3]}"
    assert sum(len(b["results"]) for b in done) == 256
    assert samples and max(samples) <= 1, samples
    assert _active(base, key) == before


def test_two_api_switches_and_a_cli_switch_at_once_leave_exactly_one(keyed_compose) -> None:
    cat, key, base = keyed_compose
    ns = config_ns()

    def api(name: str) -> subprocess.Popen:
        argv = ["ip", "netns", "exec", ns, "curl", "-sS", "-o", "/dev/null", "-w",
                "%{http_code}", "--max-time", "600", "-X", "POST", "-H",
                f"Authorization: Bearer {key}", "-H", "Content-Type: application/json", "-d",
                json.dumps({"model": name}), f"{base}/switch"]  # fmt: skip
        return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)

    for api_names, cli_name in ((("qwen", "gpt-oss"), "gpt-oss"), (("gpt-oss", "qwen"), "qwen")):
        calls = [api(name) for name in api_names]
        cli = invoke("switch", "-i", INVENTORY, "--catalog", str(cat.path), "--model", cli_name)
        codes = [p.communicate(timeout=600)[0] for p in calls]
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert codes == ["200", "200"], codes
        assert _containers_serving() == 1
        active = _active(base, key)
        assert active in ("qwen3-coder-30b", "gpt-oss-120b")
        assert http_code(f"http://{ADDRESS}:{cat.resolve(active).port}/health") == 200


def _six_at_once(url: str, key: str, body: dict[str, Any]) -> list[int]:
    """Six keyed POSTs of `body` to `url` at once: their status codes."""
    codes: list[int] = []

    def ask() -> None:
        codes.append(_post(url, key, body)[0])

    askers = [threading.Thread(target=ask) for _ in range(6)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(timeout=300)
    return codes


def test_an_idle_model_sleeps_and_the_routing_and_front_door_wake_it_for_six_at_once(
    keyed_compose, models, tmp_path: Path
) -> None:
    """Idle sleep on Compose through the control service: the default model, idle for 5 s,
    stops by itself (nothing serves, the status says asleep); a request without the key does
    not wake it; six keyed requests at once naming it are all answered, by one container; asleep
    again, the same through the front door."""
    from tests.integration.helpers import keyed_catalog_file

    _, key, base = keyed_compose
    path = keyed_catalog_file(tmp_path)
    raw = yaml.safe_load(path.read_text())
    for model in raw["models"]:
        if model["name"] == models.default.name:
            model["idle_unload_s"] = 5
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    done = invoke("provision", "-i", INVENTORY, "--catalog", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    try:
        wait_for(lambda: http_code(f"{base}/health") == 200, 60, "the control service")
        moved = invoke("switch", "-i", INVENTORY, "--catalog", str(path), "--model",
                       models.default.name)  # fmt: skip
        assert moved.returncode == 0, moved.stdout + moved.stderr

        def asleep() -> str | None:
            code, body = _call(f"{base}/status", key)
            return (json.loads(body).get("asleep") or {}).get("model") if code == 200 else None

        wait_for(lambda: asleep() == models.default.name, 60, "the idle model asleep", 1)
        assert _containers_serving() == 0
        chat_body = {"model": models.default.name, "max_tokens": 8,
                     "messages": [{"role": "user", "content": "Hello"}]}  # fmt: skip
        assert _post(f"{base}/v1/chat/completions", None, chat_body)[0] == 401
        time.sleep(3)
        assert _containers_serving() == 0 and asleep() == models.default.name
        codes = _six_at_once(f"{base}/v1/chat/completions", key, chat_body)
        assert codes == [200] * 6, codes
        assert _containers_serving() == 1 and _active(base, key) == models.default.name
        # Asleep again: the front door wakes it the same way (a request that names no model).
        wait_for(lambda: asleep() == models.default.name, 60, "the idle model asleep again", 1)
        door = f"{_front_door(models)}/v1/chat/completions"
        del chat_body["model"]
        assert _post(door, None, chat_body)[0] == 401
        time.sleep(3)
        assert _containers_serving() == 0 and asleep() == models.default.name
        codes = _six_at_once(door, key, chat_body)
        assert codes == [200] * 6, codes
        assert _containers_serving() == 1 and _active(base, key) == models.default.name
    finally:
        back = tmp_path / "back"
        back.mkdir()
        keyed = invoke("provision", "-i", INVENTORY, "--catalog", str(keyed_catalog_file(back)))
        assert keyed.returncode == 0, keyed.stdout[-2000:]


def test_a_key_rotation_gives_every_way_in_the_new_key(keyed_compose, models) -> None:
    """Last in the module (the key the fixture read changes): `invoke key.rotate -i` runs the
    host's rotate-key in switchd — the project's key file rewritten in place, the serving model
    restarted with it — and restarts the control service; the old key is refused on the model's
    port, the control API and the front door, the new one works on all three."""
    cat, old, base = keyed_compose
    serving_before = _active(base, old)
    done = invoke("key.rotate", "-i", INVENTORY, "--catalog", str(cat.path))
    assert done.returncode == 0, done.stdout + done.stderr
    engine = engine_mod.project(INVENTORY, ADDRESS)[0]
    key_file = engine.dir / "secrets" / "api-key"
    new = key_file.read_text().strip()
    assert new != old and len(new) >= 32 and str(key_file) in done.stdout
    assert oct(key_file.stat().st_mode & 0o777) == "0o600" and key_file.stat().st_uid == 10001
    wait_for(lambda: http_code(f"{base}/health") == 200, 60, "the control service again")
    port = f"http://{ADDRESS}:{cat.resolve(serving_before).port}/v1/models"
    for url in (port, f"{base}/status", f"{_front_door(cat)}/v1/models"):
        assert _call(url, old)[0] == 401, url
        assert _call(url, new)[0] == 200, url
    assert _active(base, new) == serving_before and _containers_serving() == 1
