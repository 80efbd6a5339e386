"""The catalog as a Compose project on a real engine (issue 25; marker `compose`: it builds
llama.cpp into an image, minutes): Debian's docker.io started by the test, the base image made
from the test bed's Debian rootfs. `invoke provision -i local-compose` renders, builds and
serves the default CPU stand-in; the LAN client reaches it on the controller's LAN address; the
switch moves it, rolls back from a broken model, two at once leave one container serving, and
one whose CLI is killed finishes by itself; a container started by hand beside the serving one
refuses to load."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from llamavm import REPO_ROOT
from llamavm.inputs import catalog
from llamavm.platforms.compose.engine import Engine
from llamavm.platforms.compose.render import LABEL
from llamavm.testbed import docker as engine_mod
from tests.integration.helpers import (
    INVOKE,
    SHARE,
    client_curl,
    http_code,
    invoke,
    lan_chat,
    wait_for,
)

pytestmark = [pytest.mark.testbed, pytest.mark.compose]

INVENTORY = engine_mod.INVENTORY
ADDRESS = engine_mod.ADDRESS


@pytest.fixture(scope="module")
def engine(testbed_info) -> Iterator[Engine]:
    why = engine_mod.available()
    if why:
        pytest.skip(why)
    engine_mod.install()
    proc = engine_mod.start()
    try:
        yield engine_mod.project(INVENTORY, ADDRESS)[0]
    finally:
        left = engine_mod.docker("ps", "-aq", "--filter", f"label={LABEL}.model",
                                 check=False).stdout.split()  # fmt: skip
        if left:
            engine_mod.docker("rm", "-f", *left, check=False)
        engine_mod.stop(proc)


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
    health = {m["name"]: m["health"] for m in answer["models"]}
    assert health[other.name] == 200 and health[models.default.name] is None
    again = invoke("switch", "-i", INVENTORY, "--model", other.name)
    assert again.returncode == 0 and "already serving" in again.stdout


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


def test_a_broken_model_rolls_back(provisioned_compose, models, tmp_path: Path) -> None:
    engine, _ = provisioned_compose
    before = serving(engine)
    bad = SHARE / "tiny" / "llamavm-compose-broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    raw = yaml.safe_load(models.path.read_text())
    raw["models"].append({"name": "broken", "gguf": "tiny/llamavm-compose-broken.gguf",
                          "port": 8039, "ctx_size": 512, "health_timeout_s": 30})  # fmt: skip
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        assert invoke("provision", "-i", INVENTORY, "--catalog", str(path)).returncode == 0
        broken = invoke("switch", "-i", INVENTORY, "--catalog", str(path), "--model", "broken")
        assert broken.returncode == 1, broken.stdout + broken.stderr
        last = broken.stderr.strip().splitlines()[-1]
        assert "broken did not become healthy" in last and f"{before[0]} serves again" in last
        assert serving(engine) == before
        assert chat(models.resolve(before[0]))[0] == "200"
    finally:
        bad.unlink()
        assert invoke("provision", "-i", INVENTORY).returncode == 0


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
    assert "did not start" in last and f"{models.default.name} serves again" in last, last
    assert serving(engine) == [models.default.name]
    assert chat(models.default)[0] == "200"
