"""Static checks of the llama_cpp role (no hosts): interface in sync, playbooks parse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llamavm import REPO_ROOT, source

ROLE = REPO_ROOT / "ansible" / "roles" / "llama_cpp"
VENV_BIN = Path(sys.executable).parent


def _defaults() -> dict[str, object]:
    return yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())


def _spec(entry: str = "main") -> dict[str, dict[str, object]]:
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    return specs["argument_specs"][entry]["options"]


def test_defaults_agree_with_the_controller_pins() -> None:
    cfg = source.load_config()
    pins = yaml.safe_load((REPO_ROOT / "config" / "llama_cpp.yaml").read_text())
    defaults = _defaults()
    assert defaults["llama_cpp_source_version"] == cfg.label
    assert defaults["llama_cpp_git_repo"] == pins["git"]["repo"]
    assert defaults["llama_cpp_git_ref"] == pins["git"]["ref"]
    assert defaults["llama_cpp_keep_builds"] == pins["keep_builds"]


@pytest.mark.parametrize("playbook", ["llama_cpp.yml", "rollback.yml", "provision.yml", "vm.yml"])
def test_playbook_syntax(playbook: str) -> None:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible" / "ansible.cfg")}
    proc = subprocess.run(
        [
            str(VENV_BIN / "ansible-playbook"),
            "--syntax-check",
            "-i",
            "localhost,",
            str(REPO_ROOT / "ansible" / "playbooks" / playbook),
        ],
        cwd=REPO_ROOT / "ansible",
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
