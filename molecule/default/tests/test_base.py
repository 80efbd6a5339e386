"""testinfra checks of the base role, as a user would see the host."""

from __future__ import annotations

import pytest


def test_admin_user_has_passwordless_sudo(host) -> None:
    admin = host.user("llamavm")
    assert "sudo" in admin.groups
    sudoers = host.file("/etc/sudoers.d/llamavm")
    assert sudoers.mode == 0o440
    assert "NOPASSWD: ALL" in sudoers.content_string


def test_ssh_is_key_only(host) -> None:
    effective = dict(line.split(" ", 1) for line in host.check_output("sshd -T").splitlines())
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["permitrootlogin"] == "no"
    assert effective["authenticationmethods"] == "publickey"


def test_ssh_is_running_and_listening(host) -> None:
    assert host.service("ssh").is_running
    assert host.service("ssh").is_enabled
    assert host.socket("tcp://0.0.0.0:22").is_listening


def test_journal_is_persistent(host) -> None:
    assert (
        "Storage=persistent"
        in host.file("/etc/systemd/journald.conf.d/10-llamavm-base.conf").content_string
    )
    assert host.file("/var/log/journal").is_directory
    machine_id = host.file("/etc/machine-id").content_string.strip()
    assert host.file(f"/var/log/journal/{machine_id}").is_directory


def test_timesync_enabled_and_skipped_only_in_a_container(host) -> None:
    timesyncd = host.service("systemd-timesyncd")
    assert timesyncd.is_enabled
    in_container = host.run("systemd-detect-virt --container").rc == 0
    if in_container:
        condition = host.check_output("systemctl show -p ConditionResult --value systemd-timesyncd")
        assert condition == "no"
    else:
        assert timesyncd.is_running


def test_unattended_upgrades_off_by_default(host) -> None:
    conf = host.file("/etc/apt/apt.conf.d/20auto-upgrades").content_string
    assert 'APT::Periodic::Unattended-Upgrade "0";' in conf


@pytest.mark.parametrize(
    "package", ["openssh-server", "python3-apt", "curl", "build-essential", "cmake", "git"]
)
def test_base_packages_installed(host, package: str) -> None:
    assert host.package(package).is_installed
