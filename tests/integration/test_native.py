"""Host-native (issue 25): the test bed converged as a model host of kind native
(inventories/local-native) — the roles run on the box itself, no VM and no passthrough. The gpu
role finds no NVIDIA driver there, installs nothing and says why (a native host keeps the driver
it has: llamavm installs none there); llama.cpp builds for the CPU; the model serves the LAN; a
second provision changes nothing. Then the test bed goes back to its own inventory."""

from __future__ import annotations

import json

import pytest

from tests.integration.helpers import host_run, invoke, lan_chat

pytestmark = pytest.mark.testbed

NATIVE = "local-native"
SOURCES = "/etc/apt/sources.list.d/llamavm-nvidia-cuda.sources"


@pytest.fixture
def native(provisioned, models):
    first = invoke("provision", "-i", NATIVE)
    try:
        yield first
    finally:
        back = invoke("provision")
        assert back.returncode == 0, back.stdout[-3000:] + back.stderr


def test_the_test_bed_converges_as_a_native_host_and_serves_the_lan(native, models, host) -> None:
    assert native.returncode == 0, native.stdout[-4000:] + native.stderr
    plan = json.loads(host_run("cat /etc/llamavm/gpu.json").stdout)
    assert (plan["platform"], plan["action"], plan["packages"]) == ("native", "none", [])
    assert "installs no driver on a native host" in plan["why"]
    assert "gpu: nothing to install on testbed" in native.stdout
    assert host_run(f"test -e {SOURCES}").returncode == 1  # no NVIDIA repository added
    # The same model services: the default model answers a chat from the LAN.
    code, body = lan_chat(f"http://{host}:{models.default.port}")
    assert code == "200", body
    assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    again = invoke("provision", "-i", NATIVE)
    assert again.returncode == 0, again.stderr
    assert "testbed: up to date" in again.stdout and "no changes" in again.stdout, again.stdout
