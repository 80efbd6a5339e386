"""WSL 2 builds: the llamavm_wsl spec's checks, the files written into the distro, the cloud-init
user-data (validated against the guest's cloud-init schema) and the Windows side's PowerShell
script — compared with golden files, one per branch (mirrored networking with .wslconfig
resources; port proxies without a keep-alive), plus what each branch must and must not do.
Regenerate the golden files with LLAMAVM_UPDATE_GOLDEN=1 after a deliberate change."""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
from typing import Any

import pytest
import yaml

from llamavm import REPO_ROOT
from llamavm.platforms import wsl
from llamavm.platforms.vm import vmspec

GOLDEN = REPO_ROOT / "tests" / "fixtures" / "wsl"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBqt8Sx/EMbJTWWe337WU/+y9Dt0UbAvKLxSVNi+dM0M op@lab"
PORTS = [8001, 8002, 8090, 9100]


def _spec(**data: Any) -> wsl.WslSpec:
    raw = {"image": "debian-12-offline", "ssh_authorized_keys": [KEY], **data}
    hostvars = {"ansible_port": 2222, "ansible_user": "llamavm"}
    return wsl.parse("inventory: host wsl-box", "wsl-box", raw, hostvars, PORTS)


MIRRORED = _spec(name="llamavm", processors=12, memory_gib=48)
PORTPROXY = _spec(
    name="llamavm-w10", networking="portproxy", keepalive=False, install_dir="D:\\WSL\\llamavm"
)


def _script(spec: wsl.WslSpec) -> str:
    return wsl.render(spec)[f"install-{spec.name}.ps1"]


@pytest.mark.parametrize(("spec", "golden"), [(MIRRORED, "install-mirrored.ps1"),
                                              (PORTPROXY, "install-portproxy.ps1")])  # fmt: skip
def test_the_powershell_script_matches_its_golden_file(spec, golden) -> None:
    text = _script(spec)
    path = GOLDEN / golden
    if os.environ.get("LLAMAVM_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{golden} changed: review, then LLAMAVM_UPDATE_GOLDEN=1"


def _code(text: str) -> str:
    """The script's code: comments and block comments dropped, every string emptied. Fails on
    a string or block comment left open (PowerShell's quoting: '' inside '...', ` escapes)."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text.startswith("<#", i):
            end = text.find("#>", i + 2)
            assert end >= 0, "a block comment is left open"
            i = end + 2
        elif text[i] == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text[i] in "'\"":
            quote, j = text[i], i + 1
            while True:
                assert j < n, f"a {quote} string is left open at {text[i : i + 40]!r}"
                escaped = quote == '"' and text[j] == "`"
                if escaped or (text[j] == quote and text[j + 1 : j + 2] == quote):
                    j += 2
                elif text[j] == quote:
                    break
                else:
                    j += 1
            out.append(quote * 2)
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


@pytest.mark.parametrize("spec", [MIRRORED, PORTPROXY], ids=["mirrored", "portproxy"])
def test_the_script_is_balanced_and_leaves_no_template_behind(spec) -> None:
    text = _script(spec)
    code = _code(text)
    for opening, closing in ("{}", "()", "[]"):
        assert code.count(opening) == code.count(closing), (opening, closing)
    assert "{%" not in text and "{{" not in text and "}}" not in text
    assert text.count("<#") == text.count("#>") == 1
    assert "$ErrorActionPreference = 'Stop'" in text
    # "$name: ..." doesn't parse ('$name:' reads as a drive-qualified name): write "${name}:".
    bad = re.findall(r"\$(?!env:|script:|global:|using:)[A-Za-z_]\w*:(?![A-Za-z_])", text)
    assert not bad, bad
    # Every function the script calls is defined in it (or is a cmdlet).
    defined = set(re.findall(r"^function ([A-Za-z-]+)", text, flags=re.M))
    for called in set(
        re.findall(
            r"\b((?:Test|Invoke|Set|Update)-(?:Administrator|Wsl|WslConfigValue|PortProxy))\b", code
        )
    ):
        assert called in defined, called


def test_mirrored_networking_uses_the_hyperv_firewall_and_wslconfig() -> None:
    text = _script(MIRRORED)
    assert "Set-WslConfigValue -Key 'networkingMode' -Value 'mirrored'" in text
    assert "Set-WslConfigValue -Key 'vmIdleTimeout' -Value '-1'" in text
    assert "Set-WslConfigValue -Key 'processors' -Value '12'" in text
    assert "Set-WslConfigValue -Key 'memory' -Value '48GB'" in text
    assert "-lt 22621" in text  # Windows 11 22H2 or later, else a clear stop
    assert "New-NetFirewallHyperVRule" in text
    assert "-VMCreatorId '{40E0AC32-46A5-438A-A0B2-2B479E8F2E90}'" in text
    assert "$Ports = @(2222, 8001, 8002, 8090, 9100)" in text
    assert "netsh" not in _code(text) and "portproxy add" not in text
    assert "(Join-Path $env:LOCALAPPDATA 'llamavm\\llamavm')" in text
    assert "Execute 'wsl.exe' -Argument \"-d $Distro --exec /bin/true\"" in text
    assert "keep-alive" not in text.split("# 5.")[1]


def test_port_proxies_follow_the_distros_address_through_a_logon_task() -> None:
    text = _script(PORTPROXY)
    code = _code(text)
    assert "netsh interface portproxy add v4tov4" in text and "Update-PortProxy" in code
    assert "New-NetFirewallRule" in text and "HyperV" not in code
    assert "networkingMode" not in text and "22621" not in text
    assert "-RefreshPortProxy" in text and "-RunLevel Highest" in text
    assert "processors" not in code and "'memory'" not in text
    assert "[string]$InstallDir = 'D:\\WSL\\llamavm'," in text
    assert "Write-Warning" in text and "keepalive: false" in text


def test_the_user_data_goes_where_wsls_datasource_reads_it() -> None:
    text = _script(MIRRORED)
    assert "Join-Path $env:USERPROFILE '.cloud-init'" in text
    assert '"$Distro.user-data"' in text
    user = yaml.safe_load(wsl.render(MIRRORED)["llamavm.user-data"])
    assert user["users"][0]["name"] == "llamavm" and user["ssh_pwauth"] is False
    assert user["users"][0]["ssh_authorized_keys"] == [KEY] and user["hostname"] == "llamavm"


def test_the_distro_runs_systemd_and_logs_in_as_the_admin() -> None:
    files = wsl.rootfs_files(MIRRORED)
    conf = configparser.ConfigParser()
    conf.read_string(files["etc/wsl.conf"][0])
    assert conf["boot"]["systemd"] == "true" and conf["user"]["default"] == "llamavm"
    assert conf["network"]["hostname"] == "llamavm"
    assert conf["interop"]["enabled"] == "true"
    sshd = files["etc/ssh/sshd_config.d/llamavm-wsl.conf"][0]
    assert "Port 2222" in sshd and "PasswordAuthentication no" in sshd
    assert files["etc/sudoers.d/llamavm"] == ("llamavm ALL=(ALL:ALL) NOPASSWD: ALL\n", 0o440)
    unit = files[f"etc/systemd/system/{wsl.KEEPALIVE_UNIT}"][0]
    assert "User=llamavm" in unit and "Restart=always" in unit
    script, mode = files["usr/local/libexec/llamavm-wsl-keepalive"]
    assert mode == 0o755 and "waitfor.exe" in script and "WSLInterop" in script
    assert wsl.KEEPALIVE_UNIT.replace(".service", "") not in " ".join(wsl.rootfs_files(PORTPROXY))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"networking": "bridged"}, "llamavm_wsl.networking: 'bridged' is not a WSL networking"),
        ({"image": "ubuntu-24.04"}, "llamavm_wsl.image_sha256: the download of ubuntu-24.04"),
        ({"ssh_authorized_keys": []}, "llamavm_wsl.ssh_authorized_keys: no SSH key"),
        ({"install_dir": "C:\\WSL\\$(evil)"}, "llamavm_wsl.install_dir: .* is not a Windows path"),
        ({"name": "bad name"}, "llamavm_wsl.name: 'bad name' is not a WSL distro name"),
        ({"memory_gib": 1}, "llamavm_wsl.memory_gib"),
        ({"colour": "blue"}, "llamavm_wsl"),
    ],
)
def test_a_bad_spec_is_one_line_naming_the_key(data, fragment) -> None:
    with pytest.raises(wsl.WslError, match=fragment) as caught:
        _spec(**data)
    assert "\n" not in str(caught.value) and "inventory: host wsl-box" in str(caught.value)


def test_the_example_inventory_builds_its_spec() -> None:
    (spec,) = wsl.from_inventory("example-wsl")
    assert (spec.host, spec.name, spec.ssh_port, spec.networking) == (
        "wsl-box", "llamavm", 2222, "mirrored"
    )  # fmt: skip
    assert spec.ports == (2222, 8001, 8002, 8090, 9100)
    assert spec.image.url and spec.image.url.startswith("https://cloud-images.ubuntu.com/wsl/")
    assert dataclasses.replace(spec, networking="portproxy").digest != spec.digest


def test_a_key_file_is_read_and_checked_like_the_vm_specs(tmp_path) -> None:
    good, bad = tmp_path / "good.pub", tmp_path / "bad.pub"
    good.write_text(KEY.replace("op@lab", "file@lab") + "\n")
    bad.write_text("not a key\n")
    spec = _spec(ssh_authorized_keys=[], ssh_public_key_file=str(good))
    assert spec.ssh_keys == (KEY.replace("op@lab", "file@lab"),)
    with pytest.raises(wsl.WslError, match="is not an OpenSSH public key"):
        _spec(ssh_authorized_keys=[], ssh_public_key_file=str(bad))
    with pytest.raises(wsl.WslError, match="cannot read"):
        _spec(ssh_public_key_file=str(tmp_path / "missing.pub"))


def test_every_wsl_image_takes_its_cloud_init_from_the_images_file() -> None:
    known = vmspec.images()  # config/images.yaml, as for a VM
    for name in wsl.schema()["properties"]["image"]["enum"]:
        assert name in known, f"{name}: a WSL image that config/images.yaml does not name"
        image = wsl.Image(name, known[name].source, None, None)
        assert wsl.cloud_init(image) == known[name].cloud_init
