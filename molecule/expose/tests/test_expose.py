"""testinfra checks of the expose role on the test bed: the nftables table with SSH, metrics and
the serving model's port open; node_exporter with llamavm's series; the front door."""

from __future__ import annotations

import json
import re


def _contract(host) -> dict:
    return json.loads(host.file("/etc/llamavm/contract.json").content_string)


def test_the_firewall_table_is_loaded_and_opens_the_serving_models_port(host) -> None:
    firewall = _contract(host)["firewall"]
    assert host.service(firewall["unit"]).is_enabled
    ruleset = host.check_output(f"nft list table inet {firewall['table']}")
    assert f"dport {firewall['ssh_port']}" in ruleset or "22" in ruleset
    served = host.check_output(f"nft list set inet {firewall['table']} {firewall['set']}")
    serving = [m for m in _contract(host)["models"] if host.service(m["unit"]).is_running]
    assert len(serving) == 1 and str(serving[0]["port"]) in served


def test_node_exporter_serves_llamavm_series(host) -> None:
    metrics = _contract(host)["metrics"]
    assert (
        host.socket(f"tcp://0.0.0.0:{metrics['port']}").is_listening
        or host.socket(f"tcp://:::{metrics['port']}").is_listening
    )
    scraped = host.check_output(f"curl -fsS http://127.0.0.1:{metrics['port']}/metrics")
    assert "llamavm_" in scraped
    assert host.file(metrics["textfile"]).exists


def test_the_front_door_reaches_the_serving_model(host) -> None:
    door = _contract(host)["front_door"]
    assert host.service(door["unit"]).is_running
    health = host.run(f"curl -fsS http://127.0.0.1:{door['port']}/health")
    assert health.rc == 0 and '"ok"' in health.stdout


def exposure(host, unit: str) -> float:
    """`systemd-analyze security`'s overall exposure of `unit` (0 confined .. 10 exposed)."""
    verdict = host.check_output(f"systemd-analyze security --no-pager {unit}").splitlines()[-1]
    found = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+)", verdict)
    assert found, verdict
    return float(found.group(1))


def test_every_lan_facing_service_is_confined_like_llamavms_own(host) -> None:
    """Debian ships Caddy at 5.7 and node_exporter at 9.2 ("UNSAFE"); the role's drop-ins
    confine both, and they still answer (the other tests here)."""
    contract = _contract(host)
    assert exposure(host, contract["front_door"]["unit"]) <= 2.0
    assert exposure(host, "prometheus-node-exporter.service") <= 2.0
    caddy = host.check_output("systemctl show -p CapabilityBoundingSet --value caddy.service")
    assert caddy == "" or caddy == "cap_net_bind_service", caddy
    # A thin proxy on one CPU (expose_front_door_cpus): the others are the model's.
    environment = host.check_output("systemctl show -p Environment --value caddy.service")
    assert "GOMAXPROCS=1" in environment.split(), environment
