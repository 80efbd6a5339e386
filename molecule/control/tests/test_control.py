"""testinfra checks of the control role on the test bed: the control service as its own user,
its privileged helper behind a socket, the API answering with the catalog."""

from __future__ import annotations

import json
import re


def _control(host) -> dict:
    return json.loads(host.file("/etc/llamavm/contract.json").content_string)["control"]


def test_the_control_service_runs_as_its_own_user(host) -> None:
    control = _control(host)
    service = host.service(control["unit"])
    assert service.is_running and service.is_enabled
    user = host.check_output(f"systemctl show -p User --value {control['unit']}")
    assert user == control["user"]
    assert host.socket(f"tcp://0.0.0.0:{control['port']}").is_listening


def test_the_helper_socket_is_listening_for_one_long_lived_root_helper(host) -> None:
    control = _control(host)
    socket_unit = control["helper_socket_unit"]
    assert host.service(socket_unit).is_running
    assert host.file(control["helper_socket"]).is_socket
    # one helper for every connection (no process per request), as root
    assert host.check_output(f"systemctl show -p Accept --value {socket_unit}") == "no"
    helper = socket_unit.replace(".socket", ".service")
    assert host.check_output(f"systemctl show -p User --value {helper}") in ("", "root")
    retired = socket_unit.replace(".socket", "@.service")  # a process per connection, once
    assert not host.file(f"/etc/systemd/system/{retired}").exists


def test_the_api_lists_the_catalog_and_what_serves(host) -> None:
    port = _control(host)["port"]
    models = json.loads(host.check_output(f"curl -fsS http://127.0.0.1:{port}/v1/models"))
    names = {m["id"] for m in models["data"]}
    assert {"qwen3-coder-30b", "gpt-oss-120b"} <= names


def exposure(host, unit: str) -> float:
    """`systemd-analyze security`'s overall exposure of `unit` (0 confined .. 10 exposed)."""
    verdict = host.check_output(f"systemd-analyze security --no-pager {unit}").splitlines()[-1]
    found = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+)", verdict)
    assert found, verdict
    return float(found.group(1))


def test_the_control_service_and_its_root_helper_are_confined(host) -> None:
    """The helper stays root (systemd starts units only for root) with CAP_NET_ADMIN (a status
    reads the firewall) and little else; the service on the LAN keeps nothing."""
    control = _control(host)
    helper = control["helper_socket_unit"].replace(".socket", ".service")
    assert exposure(host, helper) <= 5.0
    assert exposure(host, control["unit"]) <= 2.0
    caps = host.check_output(f"systemctl show -p CapabilityBoundingSet --value {helper}")
    assert caps == "cap_net_admin", caps
