"""Many hosts at once (llamavm.ops.fleet, and the tasks on top of it): Ansible host patterns over
the example inventories, bounded parallelism with each host's result its own, and `invoke
switch`/`stop`/`status` over several hosts — one line each, a failing host failing alone,
the exit code saying so. The hosts' side is faked at the SSH seam (remote.transaction and
remote.query); the real transactions are tested on the test bed."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from invoke import Context
from invoke.exceptions import Exit

from llamavm import REPO_ROOT
from llamavm.commands import serving
from llamavm.errors import LlamavmError
from llamavm.ops import control_api, fleet, remote

LAB = REPO_ROOT / "inventories" / "example-lab"


@pytest.fixture(autouse=True)
def over_ssh(monkeypatch) -> None:
    """The hosts are faked at the SSH seam: no try at their control API first (the lab's names
    do not resolve here, and each lookup waited for the resolver to give up)."""
    monkeypatch.setenv(control_api.VIA_ENV, "ssh")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (None, ["gpu-box-1.lan", "gpu-box-2.lan"]),
        ("gpu-box-2.lan", ["gpu-box-2.lan"]),
        ("gpu-box-*", ["gpu-box-1.lan", "gpu-box-2.lan"]),
        ("llamavm_hosts:!gpu-box-1.lan", ["gpu-box-2.lan"]),
        ("~gpu-box-[1]\\.lan", ["gpu-box-1.lan"]),
        ("gpu-box-2.lan,gpu-box-1.lan", ["gpu-box-1.lan", "gpu-box-2.lan"]),  # inventory order
        ("all:&llamavm_hosts", ["gpu-box-1.lan", "gpu-box-2.lan"]),
    ],
)
def test_host_patterns_read_as_ansible_reads_them(pattern, expected) -> None:
    assert [h.name for h in fleet.pick(LAB, pattern)] == expected


@pytest.mark.parametrize("pattern", ["hv-1.lan", "nope*", "llamavm_hypervisors"])
def test_a_pattern_with_no_model_host_is_one_line(pattern) -> None:
    with pytest.raises(LlamavmError, match="matches no host of llamavm_hosts") as caught:
        fleet.pick(LAB, pattern)
    assert "gpu-box-1.lan, gpu-box-2.lan" in str(caught.value)  # what there is
    assert caught.value.exit_code == 2


def _hosts(count: int) -> list[remote.Host]:
    return [remote.Host(f"h{i}", f"10.0.0.{i}", None, None, None, ()) for i in range(count)]


def test_at_most_forks_hosts_are_worked_on_at_once_and_results_keep_their_order() -> None:
    running, peak, lock = 0, 0, threading.Lock()

    def work(host: remote.Host) -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return host.name.upper()

    began = time.monotonic()
    results = fleet.each(_hosts(8), work, forks=3)
    assert [r for _, r in results] == [f"H{i}" for i in range(8)]
    assert peak == 3
    assert time.monotonic() - began < 8 * 0.05  # they overlapped


def test_one_hosts_failure_is_its_own_result() -> None:
    heard: list[str] = []

    def work(host: remote.Host) -> str:
        if host.name == "h1":
            raise LlamavmError("h1: unreachable")
        return "ok"

    results = fleet.each(_hosts(3), work, lambda h, r: heard.append(h.name))
    assert [type(r).__name__ for _, r in results] == ["str", "LlamavmError", "str"]
    assert sorted(heard) == ["h0", "h1", "h2"]


class FakeHosts:
    """The hosts' side of `invoke switch/stop/status`: each host answers, or fails, alone."""

    def __init__(self, failing: str | None = None) -> None:
        self.failing = failing
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.concurrent = 0
        self.peak = 0

    def transaction(self, host: remote.Host, op: str, args: list[str], *, stream: bool = True):
        with self.lock:
            self.calls.append((host.name, op))
            self.concurrent += 1
            self.peak = max(self.peak, self.concurrent)
        time.sleep(0.05)
        with self.lock:
            self.concurrent -= 1
        if host.name == self.failing:
            return 1, {"ok": False, "code": 1, "error": "the GGUF is unreadable; rolled back"}
        if op == "stop":
            return 0, {"ok": True, "code": 0, "stopped": ["qwen3-coder-30b"]}
        return 0, {"ok": True, "code": 0, "changed": True, "load_seconds": 1.5}

    def query(self, host: remote.Host, args: list[str]) -> dict[str, Any]:
        if host.name == self.failing:
            raise LlamavmError(f"{host.name}: ssh: connect to host: Connection refused")
        return {"ok": True, "active": "qwen3-coder-30b", "running": ["qwen3-coder-30b"]}


@pytest.fixture
def hosts(monkeypatch) -> FakeHosts:
    fake = FakeHosts(failing="gpu-box-2.lan")
    monkeypatch.setattr(remote, "transaction", fake.transaction)
    monkeypatch.setattr(remote, "query", fake.query)
    return fake


def test_a_switch_on_many_hosts_runs_at_once_one_line_each_and_one_fails_alone(
    hosts, capsys
) -> None:
    with pytest.raises(Exit) as caught:
        serving.switch(Context(), model="qwen", inventory=str(LAB))
    out = capsys.readouterr().out.splitlines()
    assert caught.value.code == 1
    assert "switch failed on 1 of 2 hosts: gpu-box-2.lan (exit 1)" in str(caught.value.message)
    assert out[0] == "llamavm: 2 hosts: switching to qwen3-coder-30b"
    lines = sorted(out[1:])
    assert len(lines) == 2
    assert lines[0].startswith("llamavm: gpu-box-1.lan: qwen3-coder-30b serving at http://")
    assert lines[1] == "llamavm: gpu-box-2.lan: the GGUF is unreadable; rolled back"
    assert sorted(hosts.calls) == [("gpu-box-1.lan", "switch"), ("gpu-box-2.lan", "switch")]
    assert hosts.peak == 2  # at once, not one after the other


def test_forks_one_goes_host_by_host_and_a_pattern_limits_the_hosts(hosts, capsys) -> None:
    serving.switch(Context(), model="qwen", inventory=str(LAB), host="gpu-box-1*", forks=1)
    assert hosts.calls == [("gpu-box-1.lan", "switch")]
    with pytest.raises(Exit):
        serving.switch(Context(), model="qwen", inventory=str(LAB), forks=1)
    assert hosts.peak == 1


def test_a_hosts_refusal_raised_as_an_error_keeps_its_exit_code(monkeypatch, capsys) -> None:
    """A refusal (exit 2: nothing was changed) raised on one host is reported as exit 2."""

    def transaction(host: remote.Host, op: str, args: list[str], *, stream: bool = True):
        if host.name == "gpu-box-2.lan":
            raise LlamavmError(f"{host.name}: qwen3-coder-30b does not fit", code=2)
        return 0, {"ok": True, "code": 0, "changed": True, "load_seconds": 1.5}

    monkeypatch.setattr(remote, "transaction", transaction)
    with pytest.raises(Exit) as caught:
        serving.switch(Context(), model="qwen", inventory=str(LAB))
    assert caught.value.code == 2
    assert "gpu-box-2.lan (exit 2)" in str(caught.value.message)


def test_stop_and_status_report_every_host_and_fail_for_the_one_that_did(hosts, capsys):
    with pytest.raises(Exit) as caught:
        serving.stop(Context(), inventory=str(LAB))
    assert caught.value.code == 1
    out = capsys.readouterr().out
    assert "llamavm: gpu-box-1.lan: stopped qwen3-coder-30b" in out
    assert "llamavm: gpu-box-2.lan: the GGUF is unreadable" in out
    with pytest.raises(Exit) as caught:
        serving.status(Context(), inventory=str(LAB), json=True)
    assert caught.value.code == 1
    out = capsys.readouterr().out
    assert '"gpu-box-1.lan"' in out and "Connection refused" in out


def test_an_interrupt_goes_up_at_once_without_waiting_for_the_hosts() -> None:
    def work(host: remote.Host) -> str:
        time.sleep(0.01 if host.name == "h0" else 5)
        return host.name

    def done(host: remote.Host, result: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the others still run

    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        fleet.each(_hosts(3), work, done)
    assert time.monotonic() - began < 2


def test_an_interrupted_switch_on_many_hosts_says_the_hosts_go_on(monkeypatch, capsys) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(fleet, "each", interrupted)
    with pytest.raises(Exit) as caught:
        serving.switch(Context(), model="qwen", inventory=str(LAB))
    assert caught.value.code == 130
    assert "the switch goes on on each host" in str(caught.value.message)


def test_a_pattern_matching_nothing_says_it_once(capsys) -> None:
    with pytest.raises(LlamavmError):
        fleet.pick(LAB, "nope*")
    captured = capsys.readouterr()
    assert "WARNING" not in captured.out + captured.err


# --------------------------------------------------------------------------- the local fleet

FLEET = REPO_ROOT / "inventories" / "local-fleet"


def test_the_local_fleet_inventory_is_a_lab_layout_with_racks_and_a_builder() -> None:
    from llamavm.inputs import inventory

    inv = inventory.resolve("local-fleet")
    assert (inv.fleet, inv.uses_testbed, inv.platform) == (4, True, "container")
    assert [h.name for h in fleet.pick(FLEET, None)] == [f"fleet-{i}" for i in range(1, 5)]
    assert [h.name for h in fleet.pick(FLEET, "rack_b")] == ["fleet-3", "fleet-4"]
    # Addresses as llamavm.testbed.fleet boots them; the builder is no model host.
    from llamavm.testbed import fleet as local_fleet

    hosts = {h.name: h.address for h in fleet.pick(FLEET, None)}
    assert hosts == {h.name: h.address for h in local_fleet.hosts(4)}
    assert "testbed" not in hosts
    # The fleet hosts' own known_hosts, not the test bed's.
    assert any(
        str(local_fleet.known_hosts()) in arg for arg in fleet.pick(FLEET, "fleet-1")[0].ssh_args
    )


def test_a_host_default_model_is_resolved_from_host_vars_aliases_included() -> None:
    from llamavm.inputs import catalog
    from llamavm.ops import provision

    cat = catalog.load(REPO_ROOT / "config" / "models.testbed.yaml")
    assert provision.default_models(FLEET, cat) == {"fleet-2": "gpt-oss-120b"}


def _inventory(tmp_path, group_vars: dict, host_vars: dict | None = None):
    import yaml

    (tmp_path / "group_vars" / "all").mkdir(parents=True)
    (tmp_path / "hosts.yml").write_text(
        yaml.safe_dump({"llamavm_hosts": {"hosts": {"box-1": {"ansible_host": "192.0.2.1"}}}})
    )
    (tmp_path / "group_vars" / "all" / "llamavm.yml").write_text(yaml.safe_dump(group_vars))
    if host_vars is not None:
        (tmp_path / "host_vars").mkdir()
        (tmp_path / "host_vars" / "box-1.yml").write_text(yaml.safe_dump(host_vars))
    return tmp_path


def test_a_host_default_model_not_in_the_catalog_is_one_clear_line(tmp_path) -> None:
    from llamavm.inputs import catalog
    from llamavm.ops import provision

    inv = _inventory(tmp_path, {"llamavm_catalog": "config/models.testbed.yaml"},
                     {"llamavm_default_model": "llama-9000"})  # fmt: skip
    cat = catalog.load(REPO_ROOT / "config" / "models.testbed.yaml")
    with pytest.raises(LlamavmError) as err:
        provision.default_models(inv, cat)
    message = str(err.value)
    assert "\n" not in message and err.value.exit_code == 2
    assert "box-1" in message and "llamavm_default_model: 'llama-9000'" in message
    assert "qwen3-coder-30b, gpt-oss-120b" in message


@pytest.mark.parametrize("value", [-1, 9, "four", True, 2.5])
def test_a_fleet_size_out_of_range_is_refused_with_the_file(tmp_path, value) -> None:
    from llamavm.inputs import inventory

    inv = _inventory(tmp_path, {"llamavm_testbed_fleet": value})
    with pytest.raises(LlamavmError) as err:
        inventory.resolve(str(inv))
    assert "llamavm_testbed_fleet" in str(err.value) and str(inv) in str(err.value)


def test_fleet_hosts_get_their_own_addresses_and_names() -> None:
    from llamavm.testbed import fleet as local_fleet

    hosts = local_fleet.hosts(8)
    assert [h.address for h in hosts] == [f"10.213.0.{41 + i}" for i in range(8)]
    assert len({h.ns for h in hosts} | {h.port for h in hosts}) == 16
    assert all(len(h.port) <= 15 and len(h.ns) <= 15 for h in hosts)
    for bad in (0, 9):
        with pytest.raises(LlamavmError):
            local_fleet.hosts(bad)


# --------------------------------------------------------------------------- unreachable hosts


def _fake_ssh(tmp_path, monkeypatch, stderr: str, rc: int = 255, stdout: str = "") -> None:
    """An `ssh` first on PATH that says `stderr` and exits `rc` (what OpenSSH does)."""
    import os
    import shlex

    script = tmp_path / "ssh"
    script.write_text(
        f"#!/bin/sh\nprintf '%s' {shlex.quote(stdout)}\nprintf '%s\\n' {shlex.quote(stderr)} >&2\n"
        f"exit {rc}\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


HOST = remote.Host("gpu-box-9", "192.0.2.9", "llamavm", None, None, ())


@pytest.mark.parametrize(
    "stderr",
    [
        "ssh: connect to host 192.0.2.9 port 22: Connection timed out",
        "ssh: connect to host 192.0.2.9 port 22: Connection refused",
        "ssh: connect to host 192.0.2.9 port 22: No route to host",
        "ssh: Could not resolve hostname gpu-box-9: Name or service not known",
        "llamavm@192.0.2.9: Permission denied (publickey).",
        "Host key verification failed.",
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["many-hosts", "one-host-streamed"])
def test_a_host_never_reached_fails_at_once_instead_of_waiting_for_an_outcome(
    tmp_path, monkeypatch, stderr, stream
) -> None:
    _fake_ssh(tmp_path, monkeypatch, stderr)
    monkeypatch.setattr(remote, "outcome", lambda *a, **k: pytest.fail("waited for an outcome"))
    began = time.monotonic()
    with pytest.raises(LlamavmError) as err:
        remote.transaction(HOST, "switch", ["qwen"], stream=stream)
    assert time.monotonic() - began < 5
    assert "gpu-box-9: SSH to 192.0.2.9 failed" in str(err.value)
    assert stderr.rstrip(".") in str(err.value)


def test_a_session_that_broke_after_it_began_still_asks_for_the_outcome(
    tmp_path, monkeypatch
) -> None:
    # The transaction may be running there: the reconnect path asks the host how it ended.
    _fake_ssh(tmp_path, monkeypatch, "Connection to 192.0.2.9 closed by remote host.")
    asked = []
    monkeypatch.setattr(
        remote, "outcome", lambda host, tx, **k: asked.append(tx) or (0, {"ok": True, "code": 0})
    )
    assert remote.transaction(HOST, "switch", ["qwen"], stream=False) == (
        0,
        {"ok": True, "code": 0},
    )
    assert len(asked) == 1


def test_a_streamed_command_relays_its_progress_and_returns_its_answer(
    tmp_path, monkeypatch, capfd
) -> None:
    _fake_ssh(tmp_path, monkeypatch, "pre-warming qwen: 1.0/2.0 GiB", rc=0,
              stdout='{"ok": true, "code": 0, "changed": true}\n')  # fmt: skip
    assert remote.transaction(HOST, "switch", ["qwen"], stream=True) == (
        0,
        {"ok": True, "code": 0, "changed": True},
    )
    assert "pre-warming qwen: 1.0/2.0 GiB" in capfd.readouterr().err


def test_a_streamed_command_that_hangs_is_cut_at_its_timeout(tmp_path, monkeypatch) -> None:
    script = tmp_path / "ssh"
    script.write_text("#!/bin/sh\necho started >&2\nexec sleep 30\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    began = time.monotonic()
    proc = remote.run(HOST, ["true"], stream=True, timeout=1)
    assert time.monotonic() - began < 10
    assert proc.returncode == 255 and "timed out after 1s" in proc.stderr
