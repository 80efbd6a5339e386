"""The local test bed: reachability over its LAN, SSH hardening by the base role, isolation,
the read-only model share, and a complete tear-down."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamavm import REPO_ROOT
from llamavm.testbed import config, machine, nspawn
from tests.integration.helpers import port_opened

pytestmark = pytest.mark.testbed

LOOPBACK_PORT = 47081
WILDCARD_PORT = 47080
CONTROL_SSHD_PORT = 2222


def host_sh(info: machine.TestbedInfo, script: str, check: bool = True) -> str:
    """Run SCRIPT on the host as the admin user, from the controller; its stdout."""
    proc = subprocess.run(
        [*info.ssh_command, "-o", "BatchMode=yes", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"on the host: {script!r} exited {proc.returncode}: {proc.stderr}")
    return proc.stdout


def client_curl(url: str) -> subprocess.CompletedProcess[str]:
    """curl URL from the LAN client's namespace (no proxies, short timeouts)."""
    return machine.client_run(
        ["curl", "--noproxy", "*", "-sS", "--max-time", "5", "-o", "/dev/null", "-w",
         "%{http_code}", url],
        capture_output=True,
        text=True,
    )  # fmt: skip


@pytest.fixture
def askpass() -> Iterator[Path]:
    """An SSH_ASKPASS program that answers with the throwaway user's real password."""
    cfg = config.load_config()
    with tempfile.TemporaryDirectory() as tmp:
        prog = Path(tmp) / "askpass"
        prog.write_text(f"#!/bin/sh\necho '{cfg.password}'\n")
        prog.chmod(stat.S_IRWXU)
        yield prog


def password_ssh(
    info: machine.TestbedInfo, askpass: Path, port: int
) -> subprocess.CompletedProcess:
    """Try a password login as the throwaway user from the LAN client."""
    cfg = config.load_config()
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
           "DISPLAY": ":0"}  # fmt: skip
    return machine.client_run(
        [
            "setsid", "-w", "ssh",
            "-p", str(port),
            "-o", f"UserKnownHostsFile={info.known_hosts}",
            "-o", "StrictHostKeyChecking=no",
            "-o", "PubkeyAuthentication=no",
            "-o", "PreferredAuthentications=password,keyboard-interactive",
            "-o", "NumberOfPasswordPrompts=1",
            "-o", "ConnectTimeout=5",
            f"{cfg.password_user}@{info.host_address}",
            "echo", "password-login-ok",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip


def test_status_reports_running(testbed_info: machine.TestbedInfo) -> None:
    current = machine.up()  # other tests reboot the host: the session's PID may be gone
    st = machine.status()
    assert st["state"] == "running"
    assert st["pid"] == current.pid
    assert st["addresses"]["host"] == testbed_info.host_address
    assert st["uptime_s"] is not None and st["uptime_s"] >= 0


def test_up_is_idempotent(testbed_info: machine.TestbedInfo) -> None:
    first = machine.up()
    again = machine.up()
    assert again.pid == first.pid
    assert not again.cold_build


def test_host_runs_systemd_without_failed_units(testbed_info: machine.TestbedInfo) -> None:
    state = host_sh(testbed_info, "systemctl is-system-running || true").strip()
    failed = host_sh(testbed_info, "systemctl --failed --no-legend --plain")
    assert state == "running", failed
    assert host_sh(testbed_info, "hostname").strip() == "llamavm-testbed"


def test_key_login_from_lan_client(provisioned_testbed: machine.TestbedInfo) -> None:
    proc = machine.client_run(
        [*provisioned_testbed.ssh_command, "-o", "BatchMode=yes", "id -un; hostname"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [provisioned_testbed.ssh_user, "llamavm-testbed"]


def test_password_login_refused(provisioned_testbed: machine.TestbedInfo, askpass: Path) -> None:
    # Control: the same password works against an sshd that allows passwords, so the refusal
    # below is the hardening at work, not a wrong password or a broken askpass.
    host_sh(
        provisioned_testbed,
        f"sudo systemd-run --unit=llamavm-it-pwsshd /usr/sbin/sshd -D -p {CONTROL_SSHD_PORT} "
        "-o PasswordAuthentication=yes -o KbdInteractiveAuthentication=yes "
        "-o AuthenticationMethods=any && sleep 1",
    )
    try:
        with port_opened(CONTROL_SSHD_PORT):
            control = password_ssh(provisioned_testbed, askpass, CONTROL_SSHD_PORT)
        assert control.returncode == 0, control.stderr
        assert "password-login-ok" in control.stdout
    finally:
        host_sh(provisioned_testbed, "sudo systemctl stop llamavm-it-pwsshd", check=False)

    refused = password_ssh(provisioned_testbed, askpass, 22)
    assert refused.returncode == 255
    assert "password-login-ok" not in refused.stdout
    assert "Permission denied (publickey)" in refused.stderr


def test_sshd_effective_config_is_hardened(provisioned_testbed: machine.TestbedInfo) -> None:
    effective = dict(
        line.split(" ", 1) for line in host_sh(provisioned_testbed, "sudo sshd -T").splitlines()
    )
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["permitrootlogin"] in ("no", "without-password", "prohibit-password")


def test_journal_is_persistent_and_timesync_handled(
    provisioned_testbed: machine.TestbedInfo,
) -> None:
    assert host_sh(provisioned_testbed, "test -d /var/log/journal && echo yes").strip() == "yes"
    assert host_sh(provisioned_testbed, "systemctl is-enabled systemd-timesyncd").strip() == (
        "enabled"
    )
    # In a container timesyncd is skipped by ConditionVirtualization=!container, by design.
    cond = host_sh(
        provisioned_testbed, "systemctl show -p ConditionResult --value systemd-timesyncd"
    ).strip()
    assert cond == "no"


@pytest.fixture
def listeners(testbed_info: machine.TestbedInfo) -> Iterator[None]:
    """Two HTTP servers on the host: one on 127.0.0.1 only, one on 0.0.0.0."""
    host_sh(
        testbed_info,
        "cd /tmp && "
        f"sudo systemd-run --unit=llamavm-it-lo python3 -m http.server --bind 127.0.0.1 "
        f"{LOOPBACK_PORT} && "
        f"sudo systemd-run --unit=llamavm-it-any python3 -m http.server --bind 0.0.0.0 "
        f"{WILDCARD_PORT}",
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        out = host_sh(testbed_info, "ss -Hltn", check=False)
        if f":{LOOPBACK_PORT}" in out and f":{WILDCARD_PORT}" in out:
            break
        time.sleep(0.2)
    yield
    host_sh(testbed_info, "sudo systemctl stop llamavm-it-lo llamavm-it-any", check=False)


@pytest.mark.usefixtures("listeners")
def test_isolation_loopback_port_unreachable_wildcard_reachable(
    testbed_info: machine.TestbedInfo,
) -> None:
    host = testbed_info.host_address
    with port_opened(WILDCARD_PORT), port_opened(LOOPBACK_PORT):  # past the host's firewall
        reachable = client_curl(f"http://{host}:{WILDCARD_PORT}/")
        blocked = client_curl(f"http://{host}:{LOOPBACK_PORT}/")
    assert reachable.stdout == "200", reachable.stderr
    assert blocked.returncode != 0 and blocked.stdout == "000"
    # ...while the loopback one does answer on the host itself.
    code = host_sh(
        testbed_info,
        f"curl -sS -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{LOOPBACK_PORT}/",
    )
    assert code == "200"


@pytest.mark.usefixtures("listeners")
def test_isolation_nothing_listens_on_the_outer_machine(testbed_info: machine.TestbedInfo) -> None:
    # The host's 0.0.0.0 listener lives in its own namespace, not on this machine's interfaces.
    outer = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    assert f":{WILDCARD_PORT} " not in outer
    # And the host has no route off the LAN.
    routes = host_sh(testbed_info, "ip -4 route show default")
    assert routes.strip() == ""


def test_models_share_is_read_only(testbed_info: machine.TestbedInfo) -> None:
    cfg = config.load_config()
    opts = host_sh(testbed_info, f"findmnt -no OPTIONS {cfg.models_mount}").strip()
    assert opts.split(",")[0] == "ro"
    touch = host_sh(testbed_info, f"sudo touch {cfg.models_mount}/x 2>&1 || true")
    assert "Read-only file system" in touch


def test_hardened_unit_starts_in_container(testbed_info: machine.TestbedInfo) -> None:
    """What later llama-server units need: sandboxing directives work under nspawn."""
    host_sh(
        testbed_info,
        "sudo systemd-run --unit=llamavm-it-hardened -p PrivateTmp=yes -p ProtectSystem=strict "
        "-p NoNewPrivileges=yes -p DevicePolicy=closed -p DeviceAllow=/dev/null "
        "-p PrivateDevices=yes -p ProtectHome=yes sleep 60 && sleep 1",
    )
    try:
        assert host_sh(testbed_info, "systemctl is-active llamavm-it-hardened").strip() == "active"
    finally:
        host_sh(testbed_info, "sudo systemctl stop llamavm-it-hardened", check=False)


def test_teardown_leaves_nothing_and_warm_start_keeps_state(
    provisioned_testbed: machine.TestbedInfo,
) -> None:
    """Runs last in this file: down() leaves nothing behind; up() again reuses the machine."""
    machine.down()
    left = machine.leftovers()
    assert left == {"namespaces": [], "links": [], "processes": [], "mounts": []}
    assert machine.status()["state"] == "stopped"
    machine.down()  # idempotent

    info = machine.up()
    assert not info.cold_build
    # Provisioned state survived (warm start reuses the machine rootfs).
    assert "PasswordAuthentication no" in host_sh(
        info, "cat /etc/ssh/sshd_config.d/00-llamavm-base.conf"
    )


def test_up_recovers_when_nspawn_was_killed(testbed_info: machine.TestbedInfo) -> None:
    """SIGKILL of systemd-nspawn orphans the container; `up` must not boot a twin beside it."""
    cfg = config.load_config()

    def container_inits() -> list[int]:
        inside = set(nspawn.netns_processes(cfg.lan.ns_host))
        roots = []
        for pid in inside:
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid not in inside:
                roots.append(pid)
        return roots

    pid = machine.status()["pid"]
    assert pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while machine.status()["pid"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert container_inits(), "the orphaned container should still be running"
    machine.up()
    assert len(container_inits()) == 1, "exactly one container in the host's namespace"
    assert machine.ssh(["true"]) == 0


def test_the_client_command_of_the_readme_runs_on_the_lan(
    testbed_info: machine.TestbedInfo,
) -> None:
    """`python -m llamavm.testbed client -- CMD`, as the README writes it."""
    for argv in (
        ["client", "--", "ip", "-brief", "address"],
        ["client", "ip", "-brief", "address"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "llamavm.testbed", *argv],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert testbed_info.client_address in proc.stdout
