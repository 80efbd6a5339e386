"""The model host converged inside the WSL tarball (marker `slow`): the distro booted under
systemd-nspawn on the test bed's LAN (tests/integration/wsl_distro.py), then `invoke provision`
on an inventory that names it like a real WSL site does (llamavm_platform: wsl, SSH on 2222),
llama.cpp installed as a fleet artifact the test bed builds (as for the embedded VM), the tiny
models copied from the controller. A model then answers from the LAN client, the firewall keeps
SSH on 2222 open, and a second provision changes nothing.

Minutes (a portable llama.cpp build on the test bed the first time); run alone:
    pytest -m slow tests/slow/test_wsl_converge.py
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from llamavm import REPO_ROOT
from llamavm.inputs import catalog
from llamavm.testbed import config, machine
from tests.integration.helpers import client_curl, invoke
from tests.integration.wsl_distro import ADDRESS, SSH_PORT, Distro, booted

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="boots a container and builds as root"),
]


@pytest.fixture(scope="module")
def distro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Distro]:
    machine.up()
    with booted(tmp_path_factory.mktemp("wsl-build")) as booted_distro:
        yield booted_distro


def _inventory(folder: Path, distro: Distro) -> Path:
    cfg, paths = config.load_config(), config.Paths.from_env()
    (folder / "host_vars").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "inventories" / "local-vm" / "host_vars" / "testbed.yml",
                folder / "host_vars" / "testbed.yml")  # fmt: skip
    (folder / "group_vars" / "all").mkdir(parents=True)
    hosts = {
        "llama_cpp_builders": {"hosts": {"testbed": {"ansible_host": cfg.lan.host}}},
        "llamavm_hosts": {
            "hosts": {"wsl-test": {"ansible_host": ADDRESS, "ansible_port": SSH_PORT}}
        },
    }
    (folder / "hosts.yml").write_text(yaml.safe_dump(hosts))
    (folder / "host_vars" / "wsl-test.yml").write_text(
        yaml.safe_dump(
            {
                "ansible_user": distro.spec.admin_user,
                "ansible_ssh_private_key_file": str(paths.key),
                "ansible_ssh_common_args": f"-o IdentitiesOnly=yes -o UserKnownHostsFile="
                f"{distro.known_hosts} -o StrictHostKeyChecking=yes",
            }
        )
    )
    (folder / "group_vars" / "all" / "llamavm.yml").write_text(
        yaml.safe_dump(
            {
                "llamavm_catalog": "config/models.testbed.yaml",
                "llamavm_platform": "wsl",
                "llamavm_testbed": True,
                "llama_cpp_native": False,
                "llama_cpp_artifact_dir": "/var/cache/llamavm/artifacts",
                "llama_cpp_install_packages": False,
                "llamavm_model_share": "copy",
            }
        )
    )
    return folder


def test_the_model_host_converges_inside_the_distro_and_serves_the_lan(
    distro: Distro, tmp_path: Path
) -> None:
    inventory = _inventory(tmp_path / "wsl-site", distro)
    first = invoke("provision", "-i", str(inventory), timeout=3600)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    plan = json.loads(distro.run("cat /etc/llamavm/gpu.json").stdout)
    assert (plan["platform"], plan["action"]) == ("wsl", "none")
    assert "libcuda.so.1" in plan["why"]  # no Windows driver here: the CPU build
    model = catalog.load(REPO_ROOT / "config" / "models.testbed.yaml").models[0]
    answer = client_curl(
        f"http://{ADDRESS}:{model.port}/v1/chat/completions",
        "-H", "Content-Type: application/json",
        "-d", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        timeout=120,
    )  # fmt: skip
    assert answer.returncode == 0 and '"choices"' in answer.stdout, answer.stdout + answer.stderr
    # The firewall the expose role loaded keeps the SSH port Ansible came in on open.
    assert distro.run("true").returncode == 0
    second = invoke("provision", "-i", str(inventory), timeout=3600)
    assert second.returncode == 0, second.stdout[-4000:]
    assert "converged — no changes" in second.stdout, second.stdout[-3000:]
