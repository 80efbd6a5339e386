"""Every inventory that ships (inventories/*: the local ones and the examples an operator
copies) is sound as Ansible and llamavm read it: its settings, its catalog, its model hosts with
their addresses, any per-host default model, and the provision playbook's syntax against it.
(Those that can run here are run: local by the suite, local-vm with marker `vm`, local-fleet
in tests/slow/test_fleet.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llamavm import REPO_ROOT
from llamavm.inputs import catalog, inventory
from llamavm.ops import playbook, provision, remote

INVENTORIES = sorted(p.name for p in (REPO_ROOT / "inventories").iterdir() if p.is_dir())


def test_the_examples_and_local_sites_are_all_here() -> None:
    expected = {"local", "local-vm", "local-fleet", "local-native", "example-lab",
                "example-wsl", "example-proxmox"}  # fmt: skip
    assert expected <= set(INVENTORIES)


@pytest.mark.parametrize("name", INVENTORIES)
def test_an_inventory_names_a_valid_catalog_and_reachable_model_hosts(name: str) -> None:
    inv = inventory.resolve(name)
    assert inv.platform in inventory.PLATFORMS
    cat = catalog.load(catalog.catalog_path(None, inv.catalog))
    hosts = remote.hosts(inv.path)
    assert hosts, f"{name}: no host in {remote.GROUP}"
    for host in hosts:
        assert host.address, host
    # Per-host default models resolve to catalog names.
    for host, model in provision.default_models(inv.path, cat).items():
        assert host in {h.name for h in hosts} and cat.resolve(model).name == model


@pytest.mark.parametrize("name", INVENTORIES)
def test_the_provision_playbook_parses_against_it(name: str) -> None:
    inv = inventory.resolve(name)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "--syntax-check", "-i",
         str(inv.path), str(provision.PLAYBOOK)],
        cwd=REPO_ROOT / "ansible", env=playbook.ansible_env(), capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
