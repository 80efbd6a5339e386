"""The host contract (llamavm/artifacts/contract.py): computed once on the controller, read by
the host. Quoting for systemd, the credential, URLs, and that both sides agree on its shape."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

from llamavm.artifacts import contract
from llamavm.errors import LlamavmError
from llamavm.host import contract as host_contract
from llamavm.inputs import catalog
from tests.unit.fakes.catalog import VALID


def _catalog(tmp_path: Path, **settings) -> catalog.Catalog:
    data = copy.deepcopy(VALID)
    data["settings"].update(settings)
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    return catalog.load(path)


def systemd_words(line: str) -> list[str]:
    """How systemd splits an Exec= line into argv (quotes, backslash escapes, %% and $$)."""
    words = shlex.split(line.replace("%%", "%").replace("$$", "$"), posix=True)
    return words


@pytest.mark.parametrize(
    "arg",
    ["plain", "with space", 'quote"inside', "back\\slash", "100%", "$HOME", "${X}", "'single'"],
)
def test_systemd_quote_round_trips(arg: str) -> None:
    quoted = contract.systemd_quote(arg)
    assert quoted.startswith('"') and quoted.endswith('"')
    assert "%" not in quoted.replace("%%", "") and "$" not in quoted.replace("$$", "")
    assert systemd_words(quoted) == [arg]


@pytest.mark.parametrize("arg", ["a\nExecStartPre=/bin/sh", "tab\there", "nul\x00", "del\x7f"])
def test_systemd_quote_refuses_control_characters(arg: str) -> None:
    with pytest.raises(ValueError):
        contract.systemd_quote(arg)


def test_the_contract_carries_argv_units_and_urls(tmp_path) -> None:
    cat = _catalog(tmp_path)
    data = contract.build(cat, {})
    alpha = data["models"][0]
    assert alpha["unit"] == "llamavm-model-alpha.service"
    # the default loading mode: the server reads a staged local copy of the share's file
    assert alpha["load"] == "stage"
    assert alpha["source"] == "/mnt/models/alpha/alpha.gguf"
    assert alpha["gguf"] == "/var/cache/llamavm/models/alpha.gguf"
    assert alpha["argv"][alpha["argv"].index("--model") + 1] == alpha["gguf"]
    assert alpha["systemd"]["requires_mounts_for"] == "/var/cache/llamavm/models"
    assert alpha["systemd"]["load_args"] == {"load-mode": "", "no-mmap": ""}
    assert alpha["health_url"] == "http://127.0.0.1:8001/health"
    argv = alpha["argv"]
    assert argv[0] == "/opt/llama.cpp/current/bin/llama-server"
    assert argv[argv.index("--port") + 1] == "8001" and argv[-1] == "--metrics"
    assert argv[argv.index("--fit") + 1] == "off"
    unit = alpha["systemd"]
    assert unit["conflicts"] == ["llamavm-model-beta.service"] and unit["after"] == []
    assert data["models"][1]["systemd"]["after"] == ["llamavm-model-alpha.service"]
    # policy required: the key file is a credential, %d unquoted, never the key itself
    assert '"--api-key-file" %d/api-key' in unit["exec_start"]
    assert unit["load_credential"] == "api-key:/etc/llamavm/api-key"
    words = systemd_words(unit["exec_start"].replace("%d/", "CRED/"))
    assert words == [w.replace("%d/", "CRED/") for w in argv]


def test_a_share_model_reads_the_share_without_mmap(tmp_path) -> None:
    cat = _catalog(tmp_path, loading={"default": "share", "stage_cap_gib": 3})
    data = contract.build(cat, {})
    alpha = data["models"][0]
    assert alpha["load"] == "share" and alpha["gguf"] == alpha["source"]
    assert alpha["systemd"]["requires_mounts_for"] == "/mnt/models"
    assert alpha["systemd"]["load_args"] == {
        "load-mode": '"--load-mode" "none"',
        "no-mmap": '"--no-mmap"',
    }
    assert data["loading"]["stage_cap_bytes"] == 3 << 30
    parsed = host_contract.parse(data)
    assert parsed.models[0].source == Path("/mnt/models/alpha/alpha.gguf")
    assert parsed.stage_cap_bytes == 3 << 30 and parsed.share_stall_s == 30


def test_a_model_may_choose_its_own_loading_mode(tmp_path) -> None:
    data = copy.deepcopy(VALID)
    data["models"][1]["load"] = "share"
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    models = contract.build(catalog.load(path), {})["models"]
    assert [m["load"] for m in models] == ["stage", "share"]


def test_no_credential_without_a_key_policy(tmp_path) -> None:
    data = contract.build(_catalog(tmp_path, api_key={"policy": "none"}), {})
    unit = data["models"][0]["systemd"]
    assert unit["load_credential"] is None and "--api-key-file" not in unit["exec_start"]


@pytest.mark.parametrize(
    ("bind", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8001"),
        ("::", "http://[::1]:8001"),
        ("192.168.1.7", "http://192.168.1.7:8001"),
        ("fd00::7", "http://[fd00::7]:8001"),
    ],
)
def test_health_urls_follow_the_bind_address(tmp_path, bind, url) -> None:
    data = contract.build(_catalog(tmp_path, bind_address=bind), {})
    assert data["models"][0]["base_url"] == url


def test_the_host_reads_what_the_controller_writes(tmp_path) -> None:
    cat = _catalog(tmp_path)
    data = contract.build(cat, {"alpha": {"verdict": "fits"}})
    parsed = host_contract.parse(data)
    assert parsed.resolve("a").name == "alpha"
    assert parsed.default.name == "alpha"
    assert parsed.paths.switch == Path("/usr/local/bin/llamavm-switch")
    assert parsed.paths.contract == host_contract.CONTRACT_PATH
    assert parsed.models[0].vram == {"verdict": "fits"}
    assert parsed.api_key_min_length == 32


def test_quoted_catalog_values_reach_argv_unharmed(tmp_path) -> None:
    data = copy.deepcopy(VALID)
    data["models"][0]["gguf"] = 'odd dir/we "ird" 100% $HOME \\x.gguf'
    data["models"][0]["load"] = "share"
    data["models"][0]["extra_args"] = ["--chat-template-kwargs", '{"a": "b c"}']
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    built = contract.build(catalog.load(path), {})["models"][0]
    words = systemd_words(built["systemd"]["exec_start"].replace("%d/", "CRED/"))
    assert words == [w.replace("%d/", "CRED/") for w in built["argv"]]
    assert '/mnt/models/odd dir/we "ird" 100% $HOME \\x.gguf' in words


def test_host_config_errors_name_the_key(tmp_path) -> None:
    good = yaml.safe_load(contract.HOST_CONFIG.read_text())
    for mutate, fragment in [
        (lambda d: d["paths"].update(state_dir="relative"), "paths.state_dir"),
        (lambda d: d["service"].update(user="Root User"), "service.user"),
        (lambda d: d["switch"].update(lock_timeout_s=True), "switch.lock_timeout_s"),
        (lambda d: d["api_key"].update(min_length=4), "api_key.min_length"),
    ]:
        data = copy.deepcopy(good)
        mutate(data)
        path = tmp_path / "host.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(LlamavmError, match=fragment):
            contract.load_host_config(path)


def test_the_role_expects_the_contract_version_the_host_reads() -> None:
    from llamavm import REPO_ROOT

    role_vars = yaml.safe_load(
        (REPO_ROOT / "ansible/roles/model_services/vars/main.yml").read_text()
    )
    assert role_vars["__model_services_contract_version"] == host_contract.VERSION


def test_the_firewall_opens_ssh_the_model_ports_and_the_metrics_port(tmp_path) -> None:
    cat = _catalog(
        tmp_path, expose={"allow_from": ["192.168.1.7/24", "fd00::/64"], "metrics": True}
    )
    fw = contract.build(cat, {})["firewall"]
    assert fw["enabled"] is True
    assert fw["ssh_port"] == 22
    assert fw["service_ports"] == {"node_exporter": 9100, "control": 8090}
    assert fw["model_ports"] == sorted(m.port for m in cat.models)
    # a host address written with its prefix is taken as its network
    assert fw["allow_from"] == {"ipv4": ["192.168.1.0/24"], "ipv6": ["fd00::/64"]}
    parsed = host_contract.parse(contract.build(cat, {}))
    assert parsed.firewall is not None and parsed.firewall.set == "model_ports"
    assert parsed.metrics is not None and parsed.metrics.textfile.name == "llamavm.prom"


def test_with_the_firewall_and_metrics_off_the_host_gets_neither(tmp_path) -> None:
    cat = _catalog(
        tmp_path, expose={"firewall": False, "metrics": False}, control={"enabled": False}
    )
    data = contract.build(cat, {})
    assert data["firewall"]["service_ports"] == {}
    parsed = host_contract.parse(data)
    assert parsed.firewall is None and parsed.metrics is None and parsed.control is None


def test_the_control_service_gets_its_port_routing_and_helper_socket(tmp_path) -> None:
    cat = _catalog(tmp_path, control={"port": 9090, "routing": True})
    parsed = host_contract.parse(contract.build(cat, {}))
    assert parsed.control is not None
    assert (parsed.control.port, parsed.control.routing) == (9090, True)
    assert parsed.control.helper_socket.is_absolute()


@pytest.mark.parametrize("control", [True, False])
def test_the_front_door_keeps_connections_only_with_the_control_service(tmp_path, control) -> None:
    """Its wake listener holds the front door's requests during a switch: without it, a kept
    connection could carry a request to a model being drained (firewall.py)."""
    cat = _catalog(tmp_path, expose={"front_door": {"enabled": True}}, control={"enabled": control})
    data = contract.build(cat, {})
    flag = data["front_door"]["pool_flag"]
    assert data["firewall"]["front_door"]["pool_flag"] == flag
    assert (flag is not None, data["front_door"]["keepalive_s"] > 0) == (control, control)
    fw = host_contract.parse(data).firewall
    assert fw is not None and fw.front_door_flag == (flag or "")
    if control:
        assert flag.startswith(data["paths"]["run_dir"] + "/")


def test_reasoning_presets_become_the_servers_flags(tmp_path) -> None:
    data = copy.deepcopy(VALID)
    data["models"][0]["reasoning"] = {"effort": "high", "presets": ["low", "high"]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    cat = catalog.load(path)
    assert cat.models[0].reasoning == catalog.Reasoning("high", ("low", "high"), "auto")
    assert cat.models[1].reasoning is None
    built = contract.build(cat, {})
    alpha, beta = (m["argv"] for m in built["models"])
    assert alpha[alpha.index("--reasoning-effort") + 1] == "high"
    assert alpha[alpha.index("--reasoning-format") + 1] == "auto"
    assert "--reasoning-effort" not in beta and "--reasoning-format" not in beta
