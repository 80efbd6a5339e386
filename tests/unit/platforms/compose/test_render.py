"""The catalog as a Compose project (llamavm/platforms/compose/: site, render): what `invoke
compose.render` writes for every inventory — one service per model in a profile of its own, the
models read-only, the GPU requested the Compose way only where the host has one, the key as a
secret file, a healthcheck — checked by `docker-compose config` where it is installed; the
Dockerfile's cmake flags against the llama_cpp role's; the entrypoint's lock, run for real; bad
settings refused in one line.
(tests/integration/test_compose.py builds and runs it on a real engine.)"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from llamavm import REPO_ROOT
from llamavm.errors import LlamavmError
from llamavm.inputs import catalog, inventory
from llamavm.platforms.compose import frontdoor
from llamavm.platforms.compose import render as render_mod
from llamavm.platforms.compose import site as site_mod

INVENTORIES = sorted(p.name for p in (REPO_ROOT / "inventories").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for the prepared llama.cpp source (render only copies it)."""
    folder = tmp_path_factory.mktemp("src")
    (folder / "llama.cpp").mkdir()
    (folder / "llama.cpp" / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    out = folder / "llama.cpp-test.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder / "llama.cpp", arcname="llama.cpp")
    return out


def rendered(name: str, out: Path, archive: Path, **settings: object):
    inv = inventory.resolve(name)
    if settings:
        inv = inventory.Inventory(
            path=inv.path, catalog=inv.catalog, platform=inv.platform,
            settings={**inv.settings, **settings}, sources=inv.sources,
        )  # fmt: skip
    cat = catalog.load(catalog.catalog_path(None, inv.catalog))
    site = site_mod.site(inv, cat)
    result = render_mod.render(cat, site, out, archive=archive)
    return cat, site, result, yaml.safe_load((out / "compose.yaml").read_text())


@pytest.mark.parametrize("name", INVENTORIES)
def test_every_inventory_renders_one_service_per_model(
    name: str, tmp_path: Path, archive: Path
) -> None:
    cat, site, result, doc = rendered(name, tmp_path, archive)
    services = doc["services"]
    control = {"control"} if cat.settings.control.enabled else set()
    control |= {"front-door"} if frontdoor.enabled(cat) else set()
    control |= {"metrics"} if cat.settings.expose.metrics else set()
    assert set(services) == {m.name for m in cat.models} | {"switchd"} | control
    for model in cat.models:
        svc = services[model.name]
        assert svc["profiles"][0] == model.name
        assert svc["image"] == result.image and svc["container_name"] == f"llamavm-{model.name}"
        bind = svc["volumes"][0]
        assert (bind["source"], bind["target"], bind["read_only"]) == (
            site.models_dir,
            "/models",
            True,
        )
        assert svc["ports"] == [f"{site.bind_address}:{model.port}:{model.port}"]
        assert svc["healthcheck"]["test"][-1] == f"http://127.0.0.1:{model.port}/health"
        command = svc["command"]
        assert command[command.index("--model") + 1] == f"/models/{model.gguf}"
        assert command[command.index("--port") + 1] == str(model.port)
        assert svc["user"] == "10001:10001" and svc["read_only"] and svc["cap_drop"] == ["ALL"]
        assert svc["environment"]["LLAMAVM_EXCLUSIVE"] == ("0" if model.companion else "1")
        # Prompt caches: a big model's slots on the project's slots volume, as on a host.
        kept = model.prompt_cache and not model.companion
        slots = [v for v in svc["volumes"] if v["source"] == "slots"]
        if kept:
            slot_dir = f"/var/cache/llamavm/slots/{model.name}"
            assert command[command.index("--slot-save-path") + 1] == slot_dir
            assert svc["environment"]["LLAMAVM_SLOT_DIR"] == slot_dir
            assert slots == [{"type": "volume", "source": "slots",
                              "target": "/var/cache/llamavm/slots"}]  # fmt: skip
        else:
            assert "--slot-save-path" not in command and not slots
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {})
        if site.gpu and model.n_gpu_layers > 0:
            assert devices["devices"] == [
                {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
            ]
        else:
            assert not devices
        if cat.settings.api_key.policy == "required":
            assert svc["secrets"] == ["api_key"]
            assert command[command.index("--api-key-file") + 1] == "/run/secrets/api_key"
        else:
            assert "secrets" not in svc and "--api-key-file" not in command
    assert "&id" not in (tmp_path / "compose.yaml").read_text()  # no YAML anchors


def test_a_gpu_host_reserves_the_gpu_and_a_cpu_host_renders_none(
    tmp_path: Path, archive: Path
) -> None:
    _, _, gpu, doc = rendered("example-compose", tmp_path / "gpu", archive)
    doc["services"].pop("control", None)  # no GPU: it asks switchd
    doc["services"].pop("front-door", None)  # nor Caddy
    doc["services"].pop("metrics", None)  # nor node_exporter (switchd asks nvidia-smi)
    switchd = doc["services"].pop("switchd")  # it reads nvidia-smi (utility), loads nothing
    devices = switchd["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["utility"]}]
    for svc in doc["services"].values():
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
        assert svc["build"]["args"] == {"GGML_CUDA": "ON", "APT_INSTALL": "1",
                                        "CUDA_ARCHITECTURES": "120"}  # fmt: skip
    _, _, cpu, doc = rendered("local-compose", tmp_path / "cpu", archive)
    assert all("deploy" not in svc for svc in doc["services"].values())
    assert "-cuda-" in gpu.image and "-cpu-" in cpu.image
    assert "ARG GGML_CUDA=OFF" in (tmp_path / "cpu" / "Dockerfile").read_text()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="no docker-compose here")
@pytest.mark.parametrize("name", INVENTORIES)
def test_docker_compose_config_accepts_the_project(
    name: str, tmp_path: Path, archive: Path
) -> None:
    cat, _, _, _ = rendered(name, tmp_path, archive)
    profiles = [arg for m in cat.models for arg in ("--profile", m.name)]
    done = subprocess.run(
        ["docker-compose", "-p", "llamavm", "-f", str(tmp_path / "compose.yaml"), *profiles,
         "config"],
        capture_output=True, text=True, check=False, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    normalized = yaml.safe_load(done.stdout)
    control = {"control"} if cat.settings.control.enabled else set()
    control |= {"front-door"} if frontdoor.enabled(cat) else set()
    control |= {"metrics"} if cat.settings.expose.metrics else set()
    assert set(normalized["services"]) == {m.name for m in cat.models} | {"switchd"} | control


def test_the_dockerfile_builds_with_the_llama_cpp_roles_flags(
    tmp_path: Path, archive: Path
) -> None:
    rendered("example-compose", tmp_path, archive)
    text = (tmp_path / "Dockerfile").read_text()
    role = yaml.safe_load((REPO_ROOT / "ansible/roles/llama_cpp/defaults/main.yml").read_text())
    for flag, value in role["llama_cpp_portable_cpu_flags"].items():
        assert f"'-D{flag}={value}'" in text
    for expected in ("'-DGGML_NATIVE=OFF'", "'-DBUILD_SHARED_LIBS=ON'", "'-DLLAMA_CURL=OFF'",
                     "'-DCMAKE_INSTALL_RPATH=$ORIGIN/../lib;$ORIGIN'", "'-DLLAMA_BUILD_UI=OFF'",
                     "--target llama-server", f"ADD {archive.name} /src/"):  # fmt: skip
        assert expected in text, expected
    assert (tmp_path / archive.name).read_bytes() == archive.read_bytes()
    assert "secrets/" in (tmp_path / ".dockerignore").read_text()  # the key stays out of builds


@pytest.mark.parametrize("name", INVENTORIES)
def test_only_switchd_reaches_the_engine_and_it_runs_the_host_transaction(
    name: str, tmp_path: Path, archive: Path
) -> None:
    """The switchd service: the one container with the engine's socket, no port on the LAN,
    started by a plain `docker compose up -d` (no profile), MODEL passed in; its image has the
    host package and a host contract on the Compose runtime that the host package reads."""
    from llamavm.host import contract as host_contract

    cat, site, result, doc = rendered(name, tmp_path, archive)
    services = doc["services"]
    sockets = [n for n, svc in services.items()
               if any(v["target"] == "/var/run/docker.sock" for v in svc["volumes"])]  # fmt: skip
    assert sockets == ["switchd"]
    svc = services["switchd"]
    assert "ports" not in svc and "profiles" not in svc and svc["image"] == result.switchd_image
    assert svc["container_name"] == "llamavm-switchd" and svc["init"] is True
    assert svc["environment"] == {"LLAMAVM_MODEL": "${MODEL:-}"}
    assert svc["cap_drop"] == ["ALL"] and svc["read_only"]
    assert svc["build"]["args"]["MODEL_IMAGE"] == result.image
    socket_mount = next(v for v in svc["volumes"] if v["target"] == "/var/run/docker.sock")
    assert socket_mount["source"] == site.engine_socket
    assert (tmp_path / ".env").read_text() == "COMPOSE_PROJECT_NAME=llamavm\n"
    switch = (tmp_path / "llamavm-switch").read_bytes()
    assert switch.startswith(b"#!/usr/bin/python3") and os.access(
        tmp_path / "llamavm-switch", os.X_OK
    )
    parsed = host_contract.load(tmp_path / "contract.json")
    assert parsed.runtime is not None and parsed.runtime.kind == "compose"
    assert parsed.runtime.label == "io.llamavm.model"
    assert [m.unit for m in parsed.models] == [f"llamavm-{m.name}" for m in cat.big]
    for model in parsed.models:
        assert model.health_url == f"http://llamavm-{model.name}:{model.port}/health"
        assert str(model.gguf).startswith("/models/") and model.load == "share"
    assert parsed.firewall is None
    helpers = sorted(n for n, svc in services.items()
                     if any(v["source"] == "helper" for v in svc["volumes"]))  # fmt: skip
    if cat.settings.control.enabled:
        # The control service: the server's user, no socket, its port, the key as credential;
        # only it and switchd share the helper's volume.
        assert helpers == ["control", "switchd"]
        ctl = services["control"]
        assert ctl["user"] == "10001:10001" and ctl["cap_drop"] == ["ALL"] and ctl["read_only"]
        port = cat.settings.control.port
        assert ctl["ports"] == [f"{site.bind_address}:{port}:{port}"]
        assert ctl["image"] == result.switchd_image and ctl["command"] == ["control"]
        assert parsed.control is not None and parsed.control.port == port
        assert str(parsed.control.helper_socket) == "/run/llamavm-helper/switchd.sock"
        if cat.settings.api_key.policy == "required":
            assert ctl["secrets"] == [{"source": "api_key", "target": "api-key"}]
            assert ctl["environment"] == {"CREDENTIALS_DIRECTORY": "/run/secrets"}
    else:
        assert "control" not in services and parsed.control is None and helpers == ["switchd"]
    if cat.settings.api_key.policy == "required":
        # switchd rotates the key: the project's file itself, writable, rewritten in place.
        key = [v for v in svc["volumes"] if v["source"] == "./secrets/api-key"]
        assert key == [{"type": "bind", "source": "./secrets/api-key",
                        "target": "/srv/llamavm/secrets/api-key"}]  # fmt: skip
        assert "secrets" not in svc and parsed.api_key_in_place
        assert str(parsed.api_key_file) == "/srv/llamavm/secrets/api-key"
    text = (tmp_path / "Dockerfile.switchd").read_text()
    assert "COPY llamavm-switch /usr/local/bin/llamavm-switch" in text
    assert "COPY contract.json /etc/llamavm/contract.json" in text


def test_the_front_door_is_caddy_in_front_of_the_control_services_wake_listener(
    tmp_path: Path, archive: Path
) -> None:
    """With the front door on: Caddy (switchd's image, the servers' user, no socket, no
    capability) on the proxy port of the bind address, every request to the control service's
    wake listener, which listens on the project's network (not published); the control service
    reads switchd's state read-only (a switch from elsewhere is noticed); Caddy validates it."""
    from llamavm.host import contract as host_contract

    cat, site, result, doc = rendered("local-compose", tmp_path, archive)
    assert cat.settings.expose.front_door.enabled and cat.settings.control.enabled
    services = doc["services"]
    door = services["front-door"]
    port = cat.settings.reserved_ports["proxy"]
    assert door["ports"] == [f"{site.bind_address}:{port}:{port}"]
    assert door["user"] == "10001:10001" and door["cap_drop"] == ["ALL"] and door["read_only"]
    assert door["image"] == result.switchd_image and door["entrypoint"] == ["caddy"]
    assert all(v["target"] != "/var/run/docker.sock" for v in door["volumes"])
    parsed = host_contract.load(tmp_path / "contract.json")
    assert parsed.control is not None and parsed.control.wake_bind == "0.0.0.0"
    wake = parsed.control.wake_port
    assert wake and all(str(wake) not in p for s in services.values() for p in s.get("ports", []))
    caddyfile = (tmp_path / "Caddyfile").read_text()
    assert f"reverse_proxy control:{wake} {{" in caddyfile and f"http://:{port} {{" in caddyfile
    assert "admin off" in caddyfile and "max_size 67108864" in caddyfile
    state = [v for v in services["control"]["volumes"] if v["source"] == "state"]
    assert state == [{"type": "volume", "source": "state", "target": "/var/lib/llamavm",
                      "read_only": True}]  # fmt: skip
    text = (tmp_path / "Dockerfile.switchd").read_text()
    assert "COPY Caddyfile /etc/caddy/Caddyfile" in text and " caddy" in text
    caddy = shutil.which("caddy") or next(
        (str(p) for p in Path("/var/cache/llamavm/rootfs").glob("*/usr/bin/caddy")), None
    )
    if caddy:
        done = subprocess.run([caddy, "validate", "--config", str(tmp_path / "Caddyfile"),
                               "--adapter", "caddyfile"], capture_output=True, text=True,
                              check=False, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    # The Caddyfile is part of switchd's image: a change makes a new one.
    before = result.switchd_image
    data = yaml.safe_load(Path(cat.path).read_text())
    data["settings"]["expose"]["front_door"]["wait_s"] = 33
    changed = tmp_path / "catalog.yaml"
    changed.write_text(yaml.safe_dump(data))
    other = render_mod.render(catalog.load(changed), site, tmp_path / "other", archive=archive)
    assert "response_header_timeout 93s" in (tmp_path / "other" / "Caddyfile").read_text()
    assert other.switchd_image != before
    # Without the control service there is nothing to wait through a switch: refused.
    data["settings"]["control"]["enabled"] = False
    data["settings"]["expose"]["front_door"]["wait_s"] = 120
    changed.write_text(yaml.safe_dump(data))
    with pytest.raises(LlamavmError) as caught:
        render_mod.render(catalog.load(changed), site, tmp_path / "off", archive=archive)
    assert "settings.control.enabled" in str(caught.value) and "\n" not in str(caught.value)


def test_the_metrics_are_node_exporter_reading_what_switchd_writes(
    tmp_path: Path, archive: Path
) -> None:
    """node_exporter (switchd's image, the servers' user, no capability) on the node_exporter
    port; switchd writes llamavm's series to the volume it reads (the host contract's textfile);
    only switchd writes there."""
    from llamavm.host import contract as host_contract

    cat, site, result, doc = rendered("local-compose", tmp_path, archive)
    assert cat.settings.expose.metrics
    services = doc["services"]
    node = services["metrics"]
    port = cat.settings.reserved_ports["node_exporter"]
    assert node["ports"] == [f"{site.bind_address}:{port}:{port}"]
    assert (
        node["entrypoint"] == ["prometheus-node-exporter"] and node["image"] == result.switchd_image
    )
    assert "--collector.textfile.directory=/srv/llamavm/metrics" in node["command"]
    assert node["user"] == "10001:10001" and node["cap_drop"] == ["ALL"] and node["read_only"]
    mount = {"type": "volume", "source": "metrics", "target": "/srv/llamavm/metrics"}
    assert node["volumes"] == [{**mount, "read_only": True}]
    writers = [n for n, svc in services.items() for v in svc.get("volumes", [])
               if v["source"] == "metrics" and not v.get("read_only")]  # fmt: skip
    assert writers == ["switchd"]
    parsed = host_contract.load(tmp_path / "contract.json")
    assert parsed.metrics is not None
    assert str(parsed.metrics.textfile) == "/srv/llamavm/metrics/llamavm.prom"
    assert "prometheus-node-exporter" in (tmp_path / "Dockerfile.switchd").read_text()


def test_a_render_is_stable_and_the_key_is_made_once(tmp_path: Path, archive: Path) -> None:
    _, _, first, _ = rendered("example-compose", tmp_path, archive)
    key = tmp_path / "secrets" / "api-key"
    assert "secrets/api-key" in first.changed
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_text().strip()) >= 32
    before = key.read_text()
    _, _, again, _ = rendered("example-compose", tmp_path, archive)
    assert again.changed == [] and again.image == first.image and key.read_text() == before
    assert again.switchd_image == first.switchd_image


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("llamavm_compose_engine", "kubernetes", "use one of auto, docker, podman"),
        ("llamavm_compose_gpu", "yes", "true (an NVIDIA GPU) or false"),
        ("llamavm_compose_models_dir", "models", "an absolute path"),
        ("llamavm_compose_bind_address", "lan", "an IP address"),
        ("llamavm_compose_cuda_architectures", "sm_90", 'like "90"'),
        ("llamavm_compose_engine_host", "gpu-box", "ssh://USER@HOST"),
        ("llamavm_compose_dir", 7, "an absolute path"),
        ("llamavm_compose_build_image", "debian:12 AS evil", "an image reference"),
        ("llamavm_compose_runtime_image", "x\nRUN rm -rf /", "the image llama-server runs in"),
    ],
)
def test_bad_settings_are_refused_in_one_line(key: str, value: object, said: str) -> None:
    inv = inventory.resolve("local-compose")
    settings = {**inv.settings, key: value}
    inv = inventory.Inventory(path=inv.path, catalog=inv.catalog, platform=inv.platform,
                              settings=settings, sources=inv.sources)  # fmt: skip
    cat = catalog.load(catalog.catalog_path(None, inv.catalog))
    with pytest.raises(LlamavmError) as caught:
        site_mod.site(inv, cat)
    message = str(caught.value)
    assert key in message and said in message and "\n" not in message
    assert caught.value.exit_code == 2


def test_the_entrypoint_lets_one_big_model_run(tmp_path: Path) -> None:
    """The rendered entrypoint itself, its paths moved into tmp_path: the first server takes
    the lock and runs; a second beside it says why and exits 0; a companion ignores the lock;
    once the first is gone the next one runs."""
    server = tmp_path / "bin" / "llama-server"
    server.parent.mkdir()
    server.write_text('#!/bin/sh\necho "serving $*"\nexec sleep 30\n')
    server.chmod(0o755)
    (tmp_path / "lock").mkdir()
    script = render_mod.ENTRYPOINT_SCRIPT.replace(render_mod.LOCK_DIR, str(tmp_path / "lock"))
    script = script.replace(f"{render_mod.PREFIX}/bin", str(server.parent))
    entry = tmp_path / "entrypoint"
    entry.write_text(script)
    entry.chmod(0o755)

    def start(model: str, exclusive: str = "1") -> subprocess.Popen[str]:
        env = {**os.environ, "LLAMAVM_MODEL": model, "LLAMAVM_EXCLUSIVE": exclusive}
        return subprocess.Popen([str(entry), "--port", "1"], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    first = start("qwen")
    assert first.stdout is not None and first.stdout.readline().startswith("serving")
    second = start("oss")
    out, err = second.communicate(timeout=10)
    assert second.returncode == 0 and out == ""
    assert "not starting oss" in err and "invoke switch --model oss" in err
    companion = start("embed", exclusive="0")
    assert companion.stdout is not None and companion.stdout.readline().startswith("serving")
    companion.kill()
    first.kill()
    first.wait(timeout=10)
    time.sleep(0.1)
    third = start("oss")
    assert third.stdout is not None and third.stdout.readline().startswith("serving")
    third.kill()
    third.wait(timeout=10)
    companion.wait(timeout=10)
