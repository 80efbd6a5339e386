"""A fleet of four model hosts from one inventory (marker `slow`): inventories/local-fleet, run
as an operator runs it. `invoke provision` boots the four hosts on the test bed's LAN
(llamavm.testbed.fleet) and converges them in parallel; llama.cpp comes from one artifact (no
host compiles); a second provision changes nothing on any host. Then `invoke switch` on all four at
once, and again with one host's GGUF made unreadable: that host fails alone, keeps serving its
model, and the exit code says so.

Minutes (four hosts converged on two cores); run alone:
    pytest -m slow tests/slow/test_fleet.py
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from llamavm import REPO_ROOT
from llamavm.inputs import catalog
from llamavm.testbed import config
from llamavm.testbed import fleet as local_fleet
from tests.integration.helpers import client_curl, invoke

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="boots containers as root"),
]

INVENTORY = "local-fleet"
HOSTS = ["fleet-1", "fleet-2", "fleet-3", "fleet-4"]
CATALOG = catalog.load(REPO_ROOT / "config" / "models.testbed.yaml")
QWEN, OSS = CATALOG.resolve("qwen"), CATALOG.resolve("oss")


def fleet_run(host: str, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A shell command as root on a fleet host, over SSH as an operator would."""
    cfg, paths = config.load_config(), config.Paths.from_env()
    address = next(h.address for h in local_fleet.hosts(len(HOSTS)) if h.name == host)
    return subprocess.run(
        [
            "ssh", "-i", str(paths.key), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={local_fleet.known_hosts()}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            f"{cfg.admin_user}@{address}", shlex.join(["sudo", "-n", "bash", "-c", command]),
        ],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def serving() -> dict[str, Any]:
    """host -> the model its status says is active."""
    result = invoke("status", "-i", INVENTORY, "--json", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return {host: answer.get("active") for host, answer in json.loads(result.stdout).items()}


def chat(host: str, model: catalog.Model) -> str:
    address = next(h.address for h in local_fleet.hosts(len(HOSTS)) if h.name == host)
    answer = client_curl(
        f"http://{address}:{model.port}/v1/chat/completions",
        "-H", "Content-Type: application/json",
        "-d", json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 64}),
        timeout=120,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    return answer.stdout


@pytest.fixture(scope="module")
def fleet() -> Iterator[str]:
    # From nothing: a fleet whose hosts were never provisioned.
    local_fleet.down(purge=True)
    first = invoke("provision", "-i", INVENTORY, timeout=3600)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-2000:]
    yield first.stdout
    local_fleet.down(purge=True)


def test_four_hosts_provision_from_one_build_and_converge(fleet: str) -> None:
    for host in HOSTS:
        assert f"ok: [{host}]" in fleet or f"changed: [{host}]" in fleet
        info = json.loads(fleet_run(host, "cat /opt/llama.cpp/current/BUILD-INFO.json").stdout
                          or "{}")  # fmt: skip
        # Installed from the fleet artifact: no model host compiled llama.cpp (no build tree).
        assert info.get("built_by") == "artifact", (host, info)
        assert fleet_run(host, "ls /var/lib/llamabuild/*/build 2>/dev/null").stdout == ""
    # Each host serves its own default: the catalog's, or its host_vars' (fleet-2: oss).
    assert serving() == {"fleet-1": QWEN.name, "fleet-2": OSS.name, "fleet-3": QWEN.name,
                         "fleet-4": QWEN.name}  # fmt: skip
    second = invoke("provision", "-i", INVENTORY, timeout=3600)
    assert second.returncode == 0, second.stdout[-4000:]
    assert "converged — no changes" in second.stdout, second.stdout[-3000:]
    for host in [*HOSTS, "testbed"]:
        assert f"{host} " in second.stdout  # every host in the recap, each with changed=0


def test_switch_on_four_hosts_at_once_and_one_fails_alone(fleet: str) -> None:
    # fleet-2 serves GPT-OSS (its own default), the others Qwen: all four to Qwen at once.
    both = invoke("switch", "--model", "qwen", "-i", INVENTORY, timeout=900)
    assert both.returncode == 0, both.stdout + both.stderr
    for host in HOSTS:
        assert sum(ln.startswith(f"llamavm: {host}: ") for ln in both.stdout.splitlines()) == 1
    assert set(serving().values()) == {QWEN.name}
    for host in HOSTS:
        assert "Hello from the tiny Qwen3-Coder stand-in!" in chat(host, QWEN)

    # fleet-3's GPT-OSS GGUF (served from the share, never staged) becomes unreadable: a file
    # nobody may read is mounted over it.
    gguf = f"{CATALOG.settings.share_path}/{OSS.gguf}"
    hide = (f"install -m 0000 /dev/null /run/unreadable.gguf && "
            f"mount --bind /run/unreadable.gguf {shlex.quote(gguf)}")  # fmt: skip
    assert fleet_run("fleet-3", hide).returncode == 0
    try:
        switched = invoke("switch", "--model", "oss", "-i", INVENTORY, timeout=900)
        assert switched.returncode != 0, switched.stdout
        lines = {
            h: [ln for ln in switched.stdout.splitlines() if ln.startswith(f"llamavm: {h}: ")]
            for h in HOSTS
        }
        assert all(len(found) == 1 for found in lines.values()), switched.stdout
        # fleet-3's line says it failed and why; the others' say they serve GPT-OSS.
        assert f"{OSS.gguf} is not readable" in lines["fleet-3"][0], lines["fleet-3"]
        for host in ("fleet-1", "fleet-2", "fleet-4"):
            assert f"{OSS.name} serving" in lines[host][0], lines[host]
        now = serving()
        assert now == {"fleet-1": OSS.name, "fleet-2": OSS.name, "fleet-3": QWEN.name,
                       "fleet-4": OSS.name}, (now, switched.stdout)  # fmt: skip
        # The failing host still answers with the model it had; the others with the new one.
        assert "Hello from the tiny Qwen3-Coder stand-in!" in chat("fleet-3", QWEN)
        for host in ("fleet-1", "fleet-2", "fleet-4"):
            assert "Hello from the tiny gpt-oss stand-in!" in chat(host, OSS)
    finally:
        fleet_run("fleet-3", f"umount {shlex.quote(gguf)}; rm -f /run/unreadable.gguf")
