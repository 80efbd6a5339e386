"""The WSL tarball (`invoke wsl.build`, image debian-12-offline) unpacked and booted under
systemd-nspawn as a second host on the test bed's LAN, the way `wsl --import` unpacks it and
WSL boots it with systemd: systemd runs, the admin user is the default one and logs in with
its key only, the keep-alive unit is active, and the distro has its own SSH host keys.
(What WSL itself adds — its network setup — is done here by a .network file.) Converging the
model host inside it: tests/slow/test_wsl_converge.py."""

from __future__ import annotations

import configparser
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from llamavm.platforms import wsl
from tests.integration.wsl_distro import ADDRESS, SSH_PORT, Distro, booted

pytestmark = pytest.mark.testbed


@pytest.fixture(scope="module")
def distro(testbed_info: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Distro]:
    with booted(tmp_path_factory.mktemp("wsl-build")) as booted_distro:
        yield booted_distro


def test_the_tarball_carries_the_wsl_configuration(distro: Distro) -> None:
    conf = configparser.ConfigParser()
    conf.read_string((distro.root / "etc" / "wsl.conf").read_text())
    assert conf["boot"]["systemd"] == "true"
    assert conf["user"]["default"] == distro.spec.admin_user


def test_systemd_runs_with_nothing_failed(distro: Distro) -> None:
    state = distro.run("systemctl is-system-running --wait", timeout=120)
    failed = distro.run("systemctl --failed --no-legend --plain").stdout
    assert state.stdout.strip() == "running", failed
    assert distro.run("ps -p 1 -o comm=").stdout.strip() == "systemd"


def test_the_default_user_logs_in_with_its_key_only_and_may_sudo(distro: Distro) -> None:
    assert distro.run("id -un").stdout.strip() == distro.spec.admin_user
    assert distro.run("sudo -n id -un").stdout.strip() == "root"
    status = distro.run(f"sudo -n passwd --status {distro.spec.admin_user}").stdout.split()
    assert status[1] == "L"  # no password, locked
    # The test bed's password user is not in the distro.
    assert distro.run("getent passwd pwtest || echo absent").stdout.strip() == "absent"
    refused = subprocess.run(
        ["ssh", "-p", str(SSH_PORT), "-o", "BatchMode=yes", "-o", "PubkeyAuthentication=no",
         "-o", "PreferredAuthentications=password,keyboard-interactive",
         "-o", f"UserKnownHostsFile={distro.known_hosts}", f"{distro.spec.admin_user}@{ADDRESS}",
         "true"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert refused.returncode == 255 and "Permission denied (publickey)" in refused.stderr


def test_the_keep_alive_is_active(distro: Distro) -> None:
    unit = wsl.KEEPALIVE_UNIT
    assert distro.run(f"systemctl is-active {unit}").stdout.strip() == "active"
    assert distro.run(f"systemctl is-enabled {unit}").stdout.strip() == "enabled"
    journal = distro.run(f"sudo -n journalctl -u {unit} --no-pager -o cat").stdout
    assert "no WSL interop here" in journal  # what it holds under WSL: waitfor.exe
    owner = distro.run(f"systemctl show -p User --value {unit}").stdout.strip()
    assert owner == distro.spec.admin_user


def test_the_distro_made_its_own_ssh_host_keys(distro: Distro) -> None:
    keys = sorted(p.name for p in (distro.root / "etc" / "ssh").glob("ssh_host_*_key"))
    assert "ssh_host_ed25519_key" in keys
    assert distro.run("systemctl is-active llamavm-ssh-hostkeys.service").stdout.strip() in (
        "active",
        "inactive",
    )
    listening = distro.run("ss -Htln").stdout
    assert f":{SSH_PORT} " in listening and ":22 " not in listening
