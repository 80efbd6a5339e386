"""testinfra checks of the model_services role on the test bed: one unit per catalog model,
hardened, run by the unprivileged service user; exactly one model serves, and answers."""

from __future__ import annotations

import json


def _contract(host) -> dict:
    return json.loads(host.file("/etc/llamavm/contract.json").content_string)


def test_the_contract_and_one_unit_per_model_are_installed(host) -> None:
    contract = _contract(host)
    assert host.file(contract["paths"]["contract"]).mode == 0o644
    for model in contract["models"]:
        unit = host.file(f"{contract['paths']['units_live']}/{model['unit']}")
        assert unit.exists and unit.user == "root", model["unit"]
        # As systemd reads the unit: the service user and the hardening in effect.
        shown = host.check_output(
            f"systemctl show -p User -p NoNewPrivileges -p ProtectSystem -p PrivateTmp "
            f"{model['unit']}"
        ).splitlines()
        assert f"User={contract['service']['user']}" in shown, shown
        for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes"):
            assert hardening in shown, (model["unit"], hardening)


def test_exactly_one_model_serves_and_answers_health(host) -> None:
    contract = _contract(host)
    active = [m for m in contract["models"] if host.service(m["unit"]).is_running]
    assert len(active) == 1, [m["unit"] for m in active]
    model = active[0]
    assert host.socket(f"tcp://0.0.0.0:{model['port']}").is_listening
    health = host.run(f"curl -fsS {model['health_url']}")
    assert health.rc == 0 and '"ok"' in health.stdout


def test_the_service_user_cannot_log_in(host) -> None:
    user = host.user(_contract(host)["service"]["user"])
    assert user.shell in ("/usr/sbin/nologin", "/bin/false")
    assert user.uid < 1000
