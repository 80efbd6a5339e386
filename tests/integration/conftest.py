"""Fixtures for tests on the local test bed (marker `testbed`; root only).

`testbed` brings the test bed up once per session; `provisioned_testbed` also applies the base
role. Add fixtures for later roles with `apply_roles([...])`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llamavm import REPO_ROOT
from llamavm.inputs import catalog
from llamavm.testbed import machine
from tests.integration.helpers import (
    TESTBED_CATALOG,
    VM_INVENTORY,
    clear_failpoints,
    invoke,
    remove_stale_stubs,
)

VENV_BIN = Path(sys.executable).parent
INVENTORY = REPO_ROOT / "inventories" / "local"


def _skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("the test bed needs root")
    if shutil.which("systemd-nspawn") is None and shutil.which("apt-get") is None:
        pytest.skip("no systemd-nspawn and no apt-get to install it")


def ansible_env() -> dict[str, str]:
    """Environment for ansible-playbook runs against the test bed."""
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible" / "ansible.cfg"),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_FORCE_COLOR": "0",
    }


def apply_roles(roles: list[str]) -> subprocess.CompletedProcess[str]:
    """Apply ROLES to the test bed with a throwaway playbook; fail the test with the output."""
    play = "\n".join(
        [
            "---",
            "- name: Apply roles for the integration tests",
            "  hosts: llamavm_hosts",
            "  become: true",
            "  force_handlers: true",
            "  roles:",
            *(f"    - role: {role}" for role in roles),
            "",
        ]
    )
    with tempfile.NamedTemporaryFile("w", suffix=".yml", prefix="llamavm-it-") as fh:
        fh.write(play)
        fh.flush()
        proc = subprocess.run(
            [str(VENV_BIN / "ansible-playbook"), "-i", str(INVENTORY), fh.name],
            cwd=REPO_ROOT,
            env=ansible_env(),
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        pytest.fail(f"ansible-playbook {roles} failed:\n{proc.stdout[-4000:]}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def testbed_info() -> Iterator[machine.TestbedInfo]:
    """The test bed, up (built and booted on first use; left running for the next session).

    Set LLAMAVM_TESTBED_DOWN=1 to tear it down at the end of the session.
    """
    _skip_unless_possible()
    info = machine.up()
    # What a run killed half-way may have left on the host: stubs and injected faults.
    remove_stale_stubs()
    clear_failpoints()
    yield info
    if os.environ.get("LLAMAVM_TESTBED_DOWN") == "1":
        machine.down()


@pytest.fixture(scope="session")
def provisioned_testbed(testbed_info: machine.TestbedInfo) -> machine.TestbedInfo:
    """The test bed with the base role applied."""
    apply_roles(["base"])
    return testbed_info


@pytest.fixture(scope="session")
def models() -> catalog.Catalog:
    """The test bed's catalog (tiny models)."""
    return catalog.load(TESTBED_CATALOG)


@pytest.fixture(scope="session")
def host(testbed_info: machine.TestbedInfo) -> str:
    return testbed_info.host_address


@pytest.fixture(scope="session")
def provisioned(testbed_info: machine.TestbedInfo) -> machine.TestbedInfo:
    """The test bed provisioned by `invoke provision`: base, llama.cpp, model services."""
    result = invoke("provision")
    if result.returncode != 0:
        pytest.fail(f"invoke provision failed:\n{result.stdout[-6000:]}\n{result.stderr}")
    return testbed_info


@pytest.fixture
def serving_default(provisioned, models) -> Iterator[catalog.Model]:
    """The provisioned test bed with its default model serving; failpoints cleared after."""
    result = invoke("switch", "--model", models.default.name)
    assert result.returncode == 0, result.stdout + result.stderr
    yield models.default
    clear_failpoints()


@pytest.fixture(scope="session")
def vm(testbed_info: machine.TestbedInfo) -> Any:
    """The embedded VMs provisioned (`invoke provision -i local-vm`); the model VM's spec."""
    from llamavm.platforms.vm import vmspec

    result = invoke("provision", "-i", VM_INVENTORY, timeout=3600)
    if result.returncode != 0 and "was made on" in result.stdout:
        # The lab's image changed since its VMs were made (a new package list): recreate them,
        # as its message tells an operator to.
        for spec in vmspec.from_inventory(VM_INVENTORY):
            invoke("vm.destroy", "-i", VM_INVENTORY, "--vm", spec.name, "--purge")
        result = invoke("provision", "-i", VM_INVENTORY, timeout=3600)
    if result.returncode != 0:
        pytest.fail(
            f"invoke provision -i {VM_INVENTORY} failed:\n{result.stdout[-6000:]}\n{result.stderr}"
        )
    return vmspec.from_inventory(VM_INVENTORY)[0]


@pytest.fixture(scope="session")
def nas(vm: Any) -> Any:
    """The embedded NFS server VM's spec (provisioned with the model VM)."""
    from llamavm.platforms.vm import vmspec

    return vmspec.from_inventory(VM_INVENTORY, only="llamavm-nas")[0]
