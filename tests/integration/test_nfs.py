"""The GGUF share over real kernel NFS: the embedded NFS server VM (nfs_server role, kernel nfsd)
exports the model folder; the model VM mounts it (model_share role, systemd automount). Marker
`vm` (minutes under TCG). qwen3-coder-30b is staged from the share, gpt-oss-120b is read from it."""

from __future__ import annotations

import json
import shlex
import subprocess
import time

import pytest

from llamavm import REPO_ROOT
from tests.integration.helpers import INVOKE, VM_INVENTORY, http_code, invoke, ssh_from_lan

pytestmark = [pytest.mark.testbed, pytest.mark.vm]

EXPORT = "/srv/models"
MARK = "/run/llamavm/reached-after-fetch"


def on(spec, command: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return ssh_from_lan(spec, f"sudo -n bash -c {shlex.quote(command)}", timeout=timeout)


def _serving(vm, models, name: str) -> str:
    """Switch the VM to `name`; return its server's PID."""
    result = invoke("switch", "-i", VM_INVENTORY, "--model", name)
    assert result.returncode == 0, result.stdout + result.stderr
    unit = models.resolve(name).unit
    return on(vm, f"systemctl show -p MainPID --value {unit}").stdout.strip()


def _answers(vm, model) -> bool:
    return http_code(f"http://{vm.network.ip}:{model.port}/health") == 200


@pytest.fixture
def server_back(nas):
    """Whatever a test does to the NFS server, it serves again afterwards."""
    yield
    on(nas, "systemctl start nfs-server")


def test_the_export_is_nfs4_only_read_only_and_squashed(nas) -> None:
    versions = on(nas, "cat /proc/fs/nfsd/versions").stdout.split()
    assert "-3" in versions and "+4.2" in versions and "-4.0" in versions, versions
    exports = on(nas, "exportfs -v").stdout
    assert EXPORT in exports and "ro," in exports and "root_squash" in exports, exports
    assert "10.213.0.30" in exports and "*" not in exports.split(EXPORT, 1)[1].split()[0]


def test_the_model_host_mounts_it_read_only_at_boot_and_cannot_write(vm) -> None:
    assert on(vm, "systemctl is-enabled srv-models.automount").stdout.strip() == "enabled"
    on(vm, f"ls {EXPORT} >/dev/null")  # first access mounts it
    mounts = on(vm, f"findmnt -n -o FSTYPE,OPTIONS {EXPORT}").stdout.splitlines()
    kinds = dict(line.split(None, 1) for line in mounts)
    assert sorted(kinds) == ["autofs", "nfs4"], mounts  # the automount, and the NFS mount on it
    options = kinds["nfs4"].split(",")
    for option in ("ro", "nosuid", "nodev", "noexec", "hard", "vers=4.2", "nconnect=4"):
        assert option in options, options
    # rsize asks for 1 MiB; the server grants at most its own block size (memory-dependent)
    assert int(next(o for o in options if o.startswith("rsize="))[6:]) >= 131072, options
    write = on(vm, f"touch {EXPORT}/written-by-the-model-host")
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr


def test_models_serve_from_the_share(vm, models) -> None:
    staged, shared = (next(m for m in models.models if models.load_mode(m) == k) for k in
                      ("stage", "share"))  # fmt: skip
    pid = _serving(vm, models, shared.name)
    cmdline = on(vm, f"tr '\\0' ' ' < /proc/{pid}/cmdline").stdout
    assert f"--model {EXPORT}/{shared.gguf}" in cmdline and "--load-mode none" in cmdline
    assert _answers(vm, shared)
    _serving(vm, models, staged.name)
    same = on(vm, f"cmp /var/cache/llamavm/models/{staged.name}.gguf {EXPORT}/{staged.gguf}")
    assert same.returncode == 0, same.stdout + same.stderr
    assert _answers(vm, staged)


def test_a_file_replaced_on_the_server_does_not_crash_the_served_model(vm, nas, models) -> None:
    shared = next(m for m in models.models if models.load_mode(m) == "share")
    pid = _serving(vm, models, shared.name)
    path = f"{EXPORT}/{shared.gguf}"
    replaced = on(
        nas,
        f"cp -p {path} {path}.orig && head -c 4096 /dev/urandom | cat {path} - > {path}.new "
        f"&& mv {path}.new {path}",
    )
    assert replaced.returncode == 0, replaced.stderr
    try:
        for _ in range(3):
            code = http_code(
                f"http://{vm.network.ip}:{shared.port}/completion",
                "-H", "Content-Type: application/json",
                "-d", '{"prompt": "hi", "n_predict": 2}',
            )  # fmt: skip
            assert code == 200
        now = on(vm, f"systemctl show -p MainPID --value {shared.unit}").stdout.strip()
        assert now == pid, "the server was restarted"
    finally:
        on(nas, f"mv {path}.orig {path}")


def test_a_share_server_stopped_before_a_switch_refuses_it(vm, nas, models, server_back) -> None:
    staged, shared = (next(m for m in models.models if models.load_mode(m) == k) for k in
                      ("stage", "share"))  # fmt: skip
    pid = _serving(vm, models, staged.name)
    on(vm, "sync; echo 3 > /proc/sys/vm/drop_caches")
    assert on(nas, "systemctl stop nfs-server").returncode == 0
    began = time.monotonic()
    result = invoke("switch", "-i", VM_INVENTORY, "--model", shared.name)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not reachable" in result.stderr and "model share" in result.stderr, result.stderr
    assert time.monotonic() - began < 180
    assert _answers(vm, staged)
    assert on(vm, f"systemctl show -p MainPID --value {staged.unit}").stdout.strip() == pid


def test_a_share_server_stopped_mid_switch_rolls_back(vm, nas, models, server_back) -> None:
    """The server goes away after the pre-warm, before the stop: the new server's open of the
    file hangs on the dead mount, the load watch gives up, the staged model serves again."""
    staged, shared = (next(m for m in models.models if models.load_mode(m) == k) for k in
                      ("stage", "share"))  # fmt: skip
    _serving(vm, models, staged.name)
    points = json.dumps({"after_fetch": {"mark": MARK, "sleep": 20}})
    on(vm, f"rm -f {MARK}; install -d -m 0755 /run/llamavm; umask 077; "
           f"echo '{points}' > /run/llamavm/failpoints.json")  # fmt: skip
    switch = subprocess.Popen(
        [str(INVOKE), "switch", "-i", VM_INVENTORY, "--model", shared.name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while on(vm, f"test -e {MARK}").returncode != 0:
            assert switch.poll() is None, switch.communicate()
            assert time.monotonic() < deadline, "the switch never finished its pre-warm"
            time.sleep(2)
        assert on(nas, "systemctl stop nfs-server").returncode == 0
        on(vm, "sync; echo 3 > /proc/sys/vm/drop_caches")
        out, err = switch.communicate(timeout=900)
    finally:
        switch.kill()
        on(vm, "rm -f /run/llamavm/failpoints.json")
    assert switch.returncode == 1, out + err
    assert "rolled back" in err and staged.name in err, err
    assert _answers(vm, staged)


def test_the_model_host_boots_with_the_share_server_gone(vm, nas, models, server_back) -> None:
    staged = next(m for m in models.models if models.load_mode(m) == "stage")
    _serving(vm, models, staged.name)
    assert on(nas, "systemctl stop nfs-server").returncode == 0
    on(vm, "systemctl reboot", timeout=30)
    time.sleep(10)
    began = time.monotonic()
    while ssh_from_lan(vm, "systemctl is-system-running --wait", timeout=60).returncode not in (
        0,
        1,
    ):
        assert time.monotonic() - began < 600, "the model VM did not come back"
        time.sleep(5)
    state = ssh_from_lan(vm, "systemctl is-system-running").stdout.strip()
    assert state in ("running", "degraded"), state
    # systemd broke no ordering cycle at this boot (it once dropped the share's automount, or
    # the firewall, to break one).
    cycles = ssh_from_lan(vm, "sudo journalctl -b 0 -o cat | grep 'ordering cycle' || true")
    assert cycles.stdout.strip() == "", cycles.stdout
    deadline = time.monotonic() + 300
    while not _answers(vm, staged):  # the boot unit serves the staged copy, share or not
        assert time.monotonic() < deadline, "the staged model did not serve after the boot"
        time.sleep(3)
