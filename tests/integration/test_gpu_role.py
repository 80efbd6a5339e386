"""The gpu role in check mode on the test bed, with the facts of other hosts (an Ubuntu 22.04 and
24.04 VM, a WSL 2 distro): every task's templated arguments are recorded by a callback
(tests/fixtures/gpu/callback_plugins/task_plan.py), so the tests read what the role would do —
the repository, the packages, the module flavour, the reboot — without a GPU or NVIDIA's
servers. NVIDIA's key is replaced by a local one (the test bed is offline). A native host (the
GPU box itself) is planned with and without a driver of its own."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from llamavm import REPO_ROOT
from tests.integration.conftest import INVENTORY, VENV_BIN, ansible_env
from tests.integration.helpers import STUB_MARK, host_run

pytestmark = pytest.mark.testbed

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "gpu"
UBUNTU_2204 = {"distribution": "Ubuntu", "distribution_version": "22.04",
               "distribution_release": "jammy", "os_family": "Debian",
               "kernel": "5.15.0-125-generic", "architecture": "x86_64"}  # fmt: skip
UBUNTU_2404 = {**UBUNTU_2204, "distribution_version": "24.04", "distribution_release": "noble",
               "kernel": "6.8.0-49-generic"}  # fmt: skip
WSL = {**UBUNTU_2404, "kernel": "5.15.167.4-microsoft-standard-WSL2"}
KEY = "file:///usr/share/keyrings/debian-archive-keyring.gpg"
WSL_LIB = "/run/llamavm-test-wsl-lib"
# A package that is, or pulls in, a Linux kernel driver.
DRIVER = re.compile(
    r"\b(nvidia-open|cuda-drivers|nvidia-driver|nvidia-dkms|nvidia-kernel|nvidia-headless|"
    r"linux-headers|cuda-\d+-\d+\b)"
)


def check_mode(tmp_path: Path, facts: dict[str, str], **variables: Any) -> tuple[Any, list[dict]]:
    extra = {
        "gpu_test_facts": facts,
        "gpu_repo_key_url": KEY,
        **variables,
    }
    (tmp_path / "vars.json").write_text(json.dumps(extra))
    record = tmp_path / "plan.jsonl"
    record.unlink(missing_ok=True)
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", str(INVENTORY), "--check",
         "-e", f"@{tmp_path / 'vars.json'}", str(FIXTURES / "plan.yml")],
        cwd=REPO_ROOT,
        env={**ansible_env(), "ANSIBLE_CALLBACK_PLUGINS": str(FIXTURES / "callback_plugins"),
             "ANSIBLE_CALLBACKS_ENABLED": "task_plan", "LLAMAVM_TASK_PLAN": str(record)},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    rows = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return proc, [r for r in rows if r["name"].startswith("gpu :")]


def task(rows: list[dict], name: str) -> dict:
    found = [r for r in rows if name in r["name"]]
    assert found, f"no task named like {name!r} in {[r['name'] for r in rows]}"
    return found[-1]


def recorded_plan(rows: list[dict]) -> dict[str, Any]:
    return json.loads(task(rows, "Record the plan")["args"]["content"])


def ran(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] != "skipped"]


@pytest.mark.parametrize(
    ("facts", "card", "repo", "driver", "arch"),
    [
        (UBUNTU_2204, "GA102 [GeForce RTX 3090]", "ubuntu2204", "nvidia-open", "86"),
        (UBUNTU_2404, "GH100 [H100 PCIe]", "ubuntu2404", "nvidia-open", "90"),
        (UBUNTU_2404, "GP102 [GeForce GTX 1080 Ti]", "ubuntu2404", "cuda-drivers", "61"),
    ],
    ids=["ubuntu-22.04-rtx3090", "ubuntu-24.04-h100", "ubuntu-24.04-gtx1080ti"],
)
def test_a_vm_plans_the_repository_driver_toolkit_and_one_reboot(
    testbed_info: Any, tmp_path: Path, facts: dict, card: str, repo: str, driver: str, arch: str
) -> None:
    proc, rows = check_mode(tmp_path, facts, gpu_platform="vm", gpu_card=card)
    assert proc.returncode == 0, proc.stdout[-3000:]
    plan = recorded_plan(rows)
    assert plan["packages"] == [f"linux-headers-{facts['kernel']}", driver, "cuda-toolkit-12-8"]
    assert plan["kernel_modules"] == ("open" if driver == "nvidia-open" else "proprietary")
    assert plan["cuda_architectures"] == arch
    assert plan["repo_url"] == (
        f"https://developer.download.nvidia.com/compute/cuda/repos/{repo}/x86_64/"
    )
    assert task(rows, "Add NVIDIA's CUDA repository")["changed"]
    assert task(rows, "signing key")["args"]["url"] == KEY
    # The packages come from a repository check mode can't add: the plan stands for them.
    assert task(rows, "Install the kernel headers")["status"] == "skipped"
    blacklist = task(rows, "Blacklist nouveau")
    assert blacklist["status"] == "ok" and blacklist["changed"]
    reboot = task(rows, "Reboot once")
    assert reboot["action"] == "ansible.builtin.reboot" and reboot["changed"]
    assert task(rows, "Stop when a reboot is needed")["status"] == "skipped"
    assert task(rows, "drop-in")["status"] == "ok"


def test_a_vm_that_may_not_reboot_stops_with_the_reason(testbed_info: Any, tmp_path: Path) -> None:
    proc, rows = check_mode(
        tmp_path, UBUNTU_2404, gpu_platform="vm", gpu_card="AD102 [GeForce RTX 4090]",
        gpu_reboot=False,
    )  # fmt: skip
    assert proc.returncode != 0
    stop = task(rows, "Stop when a reboot is needed")
    assert stop["status"] == "failed" and "loads only after a reboot" in stop["msg"]


def test_a_card_nobody_knows_is_refused_with_the_fix(testbed_info: Any, tmp_path: Path) -> None:
    proc, rows = check_mode(tmp_path, UBUNTU_2404, gpu_platform="vm", gpu_card="Some Future GPU")
    assert proc.returncode != 0
    assert "set gpu_compute_capability" in task(rows, "compute capability")["msg"]


@pytest.fixture
def windows_driver(testbed_info: Any) -> Any:
    """What WSL 2 mounts from the Windows driver: libcuda and an nvidia-smi (a stand-in that
    names the card) — the seam that can't exist here."""
    done = host_run(
        f"mkdir -p {WSL_LIB} && : > {WSL_LIB}/libcuda.so.1 && "
        f"printf '#!/bin/sh\\necho \"NVIDIA GeForce RTX 4090\"\\n' > {WSL_LIB}/nvidia-smi && "
        f"chmod 0755 {WSL_LIB}/nvidia-smi"
    )
    assert done.returncode == 0, done.stderr
    yield WSL_LIB
    host_run(f"rm -rf {WSL_LIB}")


def test_wsl_plans_the_toolkit_and_no_driver_in_any_task(
    windows_driver: str, tmp_path: Path
) -> None:
    proc, rows = check_mode(tmp_path, WSL, gpu_platform="wsl", gpu_wsl_lib_dir=windows_driver)
    assert proc.returncode == 0, proc.stdout[-3000:]
    plan = recorded_plan(rows)
    assert (plan["action"], plan["repo"]) == ("wsl", "wsl-ubuntu")
    assert plan["packages"] == ["cuda-toolkit-12-8"]
    assert plan["card"] == "NVIDIA GeForce RTX 4090" and plan["cuda_architectures"] == "89"
    for row in ran(rows):
        text = json.dumps(row["args"])
        if "Record the plan" in row["name"]:
            text = json.dumps(plan["packages"])
        assert not DRIVER.search(text), (row["name"], text)
    names = " ".join(r["name"] for r in ran(rows))
    assert "Reboot" not in names and "nouveau" not in names and "persistence" not in names
    assert plan["repo_url"].endswith("/repos/wsl-ubuntu/x86_64/")
    assert task(rows, "Add NVIDIA's CUDA repository")["changed"]
    assert task(rows, "Let the linker")["args"]["content"] == f"{windows_driver}\n"


def test_wsl_refuses_a_driver_package(windows_driver: str, tmp_path: Path) -> None:
    proc, rows = check_mode(
        tmp_path, WSL, gpu_platform="wsl", gpu_wsl_lib_dir=windows_driver,
        gpu_extra_packages=["cuda-drivers"],
    )  # fmt: skip
    assert proc.returncode != 0
    refused = task(rows, "no driver package is planned on WSL")
    assert refused["status"] == "failed" and "cuda-drivers" in refused["msg"]
    assert not any(r["action"].endswith("apt") and r["status"] != "skipped" for r in rows)


@pytest.fixture
def host_driver(testbed_info: Any) -> Any:
    """What a native GPU box has before llamavm comes: a driver whose nvidia-smi answers (a
    stand-in naming an H200 and its driver — the seam that can't exist here)."""
    script = f"#!/bin/sh\n# {STUB_MARK}\necho 'NVIDIA H200, 9.0, 570.124.06'\n"
    done = host_run(
        f"printf '%s' {shlex.quote(script)} > /usr/local/bin/nvidia-smi && "
        "chmod 0755 /usr/local/bin/nvidia-smi"
    )
    assert done.returncode == 0, done.stderr
    yield "/usr/local/bin/nvidia-smi"
    host_run("rm -f /usr/local/bin/nvidia-smi")


def test_a_native_host_with_its_driver_plans_the_toolkit_only(
    host_driver: str, tmp_path: Path
) -> None:
    proc, rows = check_mode(tmp_path, UBUNTU_2404, gpu_platform="native")
    assert proc.returncode == 0, proc.stdout[-3000:]
    plan = recorded_plan(rows)
    assert (plan["action"], plan["repo"]) == ("native", "ubuntu2404")
    assert plan["packages"] == ["cuda-toolkit-12-8"]
    assert (plan["card"], plan["cuda_architectures"]) == ("NVIDIA H200", "90")
    assert plan["driver_version"] == "570.124.06"
    assert task(rows, "driver found is new enough")["status"] == "ok"
    for row in ran(rows):
        text = json.dumps(plan["packages"] if "Record the plan" in row["name"] else row["args"])
        assert not DRIVER.search(text), (row["name"], text)
    names = " ".join(r["name"] for r in ran(rows))
    assert "Reboot" not in names and "nouveau" not in names and "persistence" not in names
    assert task(rows, "Add NVIDIA's CUDA repository")["changed"]


def test_a_native_host_with_a_driver_too_old_is_refused(host_driver: str, tmp_path: Path) -> None:
    proc, rows = check_mode(
        tmp_path, UBUNTU_2404, gpu_platform="native", gpu_cuda_toolkit_version="13-0",
    )  # fmt: skip
    assert proc.returncode != 0
    refused = task(rows, "driver found is new enough")
    assert refused["status"] == "failed"
    assert "570.124.06" in refused["msg"] and "580.65.06" in refused["msg"]
    assert not any(r["action"].endswith("apt") and r["status"] != "skipped" for r in rows)


@pytest.mark.parametrize(
    ("platform", "said"),
    [("container", "a container uses its host's driver"),
     ("native", "installs no driver on a native host")],
    ids=["the-test-bed-as-a-container", "a-native-host-without-a-driver"],
)  # fmt: skip
def test_no_gpu_stack_is_installed_and_the_role_says_why(
    testbed_info: Any, tmp_path: Path, platform: str, said: str
) -> None:
    proc, rows = check_mode(tmp_path, UBUNTU_2404, gpu_platform=platform)
    assert proc.returncode == 0, proc.stdout[-3000:]
    plan = recorded_plan(rows)
    assert plan["action"] == "none" and plan["packages"] == []
    assert said in task(rows, "Say why")["msg"]
    assert not [r for r in ran(rows) if r["action"].endswith(("apt", "deb822_repository"))]
