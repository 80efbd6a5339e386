"""The local inventories' paths come from llamavm.paths, through the script Ansible runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llamavm import REPO_ROOT
from llamavm.testbed import localinv

LOCAL = ["local", "local-native", "local-fleet", "local-vm"]


@pytest.mark.parametrize("name", LOCAL)
def test_each_local_inventory_runs_the_one_script_and_it_follows_the_state_folder(
    monkeypatch, tmp_path, name
):
    script = REPO_ROOT / "inventories" / name / "paths.py"
    assert script.resolve() == REPO_ROOT / "inventories" / "local" / "paths.py"
    env = {
        "LLAMAVM_STATE": str(tmp_path / "s"),
        "LLAMAVM_CACHE": str(tmp_path / "c"),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, str(script), "--list"], env=env, capture_output=True, text=True, check=True
    )
    listed = json.loads(done.stdout)
    monkeypatch.setenv("LLAMAVM_STATE", str(tmp_path / "s"))
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "c"))
    assert listed == localinv.inventory(name)
    text = json.dumps(listed)
    assert "/var/lib/llamavm" not in text and "/var/cache/llamavm" not in text
    assert str(tmp_path) in text


def test_the_test_bed_connection_is_its_state_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMAVM_STATE", str(tmp_path))
    found = localinv.inventory("local")["all"]["vars"]
    assert found["ansible_ssh_private_key_file"] == str(tmp_path / "testbed" / "id_ed25519")
    assert found["ansible_control_path_dir"] == str(tmp_path / "testbed" / "cp")
    assert "StrictHostKeyChecking=yes" in found["ansible_ssh_common_args"]
    vm = localinv.inventory("local-vm")
    assert vm["_meta"]["hostvars"]["testbed"]["ansible_ssh_private_key_file"] == str(
        tmp_path / "testbed" / "id_ed25519"
    )
    assert vm["all"]["vars"]["ansible_ssh_private_key_file"] == str(tmp_path / "vm" / "id_ed25519")
    assert "testbed" in vm["llama_cpp_builders"]["hosts"]


def test_a_host_query_adds_nothing(capsys):
    localinv.main("local", ["--host", "testbed"])
    assert json.loads(capsys.readouterr().out) == {}


def test_the_script_needs_only_the_standard_library() -> None:
    """Ansible runs paths.py with the system's python3: importing localinv must not pull in the
    rest of the test bed (PyYAML) through the package's __init__. -S: no site packages."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); import llamavm.testbed.localinv; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('llamavm'))))"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], env={"PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.split() == [
        "llamavm", "llamavm.paths", "llamavm.testbed", "llamavm.testbed.localinv"
    ]  # fmt: skip
