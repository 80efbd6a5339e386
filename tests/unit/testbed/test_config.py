"""config/testbed.yaml and the test bed's pure logic (no root, no hosts)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from llamavm.errors import LlamavmError
from llamavm.testbed import config, lan, machine, nspawn, rootfs, tools


def test_shipped_config_loads_and_has_what_roles_need() -> None:
    cfg = config.load_config()
    for pkg in ("openssh-server", "python3-apt", "systemd-timesyncd", "build-essential", "cmake"):
        assert pkg in cfg.packages
    assert cfg.lan.host in {str(a) for a in cfg.lan.subnet.hosts()}


def test_rootfs_key_ignores_order_and_tracks_the_package_set() -> None:
    cfg = config.load_config()
    shuffled = dataclasses.replace(cfg, packages=tuple(reversed(cfg.packages)))
    assert shuffled.rootfs_key == cfg.rootfs_key
    more = dataclasses.replace(cfg, packages=(*cfg.packages, "htop"))
    assert more.rootfs_key != cfg.rootfs_key
    assert cfg.rootfs_key.startswith(f"{cfg.suite}-")


def test_explicit_mirror_wins() -> None:
    cfg = dataclasses.replace(config.load_config(), mirror="http://mirror.example/debian")
    assert config.resolve_mirror(cfg) == "http://mirror.example/debian"


def _network(**changes: object) -> dict:
    raw = yaml.safe_load(config.CONFIG_PATH.read_text())["network"]
    raw.update(changes)
    return raw


def test_address_outside_subnet_is_refused() -> None:
    with pytest.raises(LlamavmError, match="not in"):
        lan.LanConfig.from_dict(_network(host="10.99.0.10"))


def test_long_interface_name_is_refused() -> None:
    with pytest.raises(LlamavmError, match="too long"):
        lan.LanConfig.from_dict(_network(bridge="a-very-long-bridge-name"))


def test_broken_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "testbed.yaml"
    bad.write_text("suite: bookworm\n")
    with pytest.raises(LlamavmError, match="invalid test-bed configuration"):
        config.load_config(bad)


def test_paths_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAVM_CACHE", "/c")
    monkeypatch.setenv("LLAMAVM_STATE", "/s")
    paths = config.Paths.from_env()
    assert paths.rootfs("k") == Path("/c/rootfs/k")
    assert paths.models == Path("/c/models")
    assert paths.key == Path("/s/testbed/id_ed25519")


def test_up_replaces_a_running_machine_whose_package_set_changed(monkeypatch, tmp_path) -> None:
    """A package added to config/testbed.yaml reaches a test bed that is already running."""
    monkeypatch.setenv("LLAMAVM_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))
    paths = config.Paths.from_env()
    paths.machine.mkdir(parents=True)
    (paths.machine / machine.MACHINE_STAMP).write_text("an-older-key\n")
    events: list[str] = []
    # Each stand-in where machine.up() looks the name up: the module that owns it.
    monkeypatch.setattr(tools, "require_root", lambda: None)
    monkeypatch.setattr(tools, "ensure_host_tools", lambda: None)
    monkeypatch.setattr(rootfs, "ensure", lambda cfg, p: (tmp_path / "rootfs", False))
    monkeypatch.setattr(machine, "ensure_keypair", lambda p: None)
    monkeypatch.setattr(lan, "up", lambda lan: None)
    monkeypatch.setattr(nspawn, "read_pid", lambda pid_file: 4242)
    monkeypatch.setattr(nspawn, "stop", lambda pid_file, timeout_s: events.append("stop"))
    monkeypatch.setattr(machine, "_kill_stale", lambda cfg: [])
    monkeypatch.setattr(machine, "_state_processes", lambda cfg, p: [])
    monkeypatch.setattr(machine, "ensure_machine", lambda cfg, p, r: events.append("machine"))
    monkeypatch.setattr(machine, "_start_nspawn", lambda cfg, p: events.append("boot") or 4343)
    monkeypatch.setattr(machine, "_wait_for_ssh", lambda cfg, p, pid: None)
    info = machine.up()
    assert events == ["stop", "machine", "boot"]
    assert info.pid == 4343


def test_rootfs_cached_only_once_the_build_stamped_it(tmp_path: Path) -> None:
    cfg = config.load_config()
    paths = config.Paths(cache=tmp_path / "cache", state=tmp_path / "state")
    assert not rootfs.cached(cfg, paths)
    built = paths.rootfs(cfg.rootfs_key)
    built.mkdir(parents=True)  # a build that died half-way: no stamp
    assert not rootfs.cached(cfg, paths)
    (built / rootfs.COMPLETE_STAMP).write_text(cfg.rootfs_key)
    assert rootfs.cached(cfg, paths)


def test_client_run_runs_in_the_client_namespace_and_returns_the_process(monkeypatch) -> None:
    """What every LAN-client check reads: the finished process, run in the client's namespace."""
    seen = []

    def run(argv, **kwargs):
        seen.append((argv, kwargs))
        return "done"

    monkeypatch.setattr(machine.lan, "is_up", lambda lan_cfg: True)
    monkeypatch.setattr(machine.subprocess, "run", run)
    assert machine.client_run(["curl", "x"], text=True) == "done"
    ns = config.load_config().lan.ns_client
    assert seen == [(["ip", "netns", "exec", ns, "curl", "x"], {"text": True, "check": False})]
    monkeypatch.setattr(machine.lan, "is_up", lambda lan_cfg: False)
    with pytest.raises(LlamavmError, match="LAN is down"):
        machine.client_run(["curl", "x"])
