"""The gpu role's plan (templates/gpu-plan.yml.j2), rendered by Ansible's own templar with the
role's defaults and vars: per platform and distribution, per card. The plan drives every task
of the role (tests/integration/test_gpu_role.py runs them in check mode on the test bed)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

from llamavm import REPO_ROOT

ROLE = REPO_ROOT / "ansible" / "roles" / "gpu"
UBUNTU_2204 = {"distribution": "Ubuntu", "distribution_version": "22.04",
               "kernel": "5.15.0-125-generic"}  # fmt: skip
UBUNTU_2404 = {"distribution": "Ubuntu", "distribution_version": "24.04",
               "kernel": "6.8.0-49-generic"}  # fmt: skip
WSL = {"distribution": "Ubuntu", "distribution_version": "24.04",
       "kernel": "5.15.167.4-microsoft-standard-WSL2"}  # fmt: skip


def plan(facts: dict[str, str], **overrides: Any) -> dict[str, Any]:
    variables = {
        **yaml.safe_load((ROLE / "defaults" / "main.yml").read_text()),
        **yaml.safe_load((ROLE / "vars" / "main.yml").read_text()),
        "ansible_managed": "managed",
        "ansible_facts": facts,
        **overrides,
    }
    templar = Templar(loader=DataLoader(), variables=variables)
    text = (ROLE / "templates" / "gpu-plan.yml.j2").read_text()
    return yaml.safe_load(templar.template(trust_as_template(text)))


def driver_patterns() -> list[str]:
    return yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["__gpu_driver_package_patterns"]


@pytest.mark.parametrize(
    ("card", "capability", "modules"),
    [
        ("GB202 [GeForce RTX 5090]", "12.0", "open"),
        ("NVIDIA GeForce RTX 5080", "12.0", "open"),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "12.0", "open"),
        ("GH100 [H100 SXM5 80GB]", "9.0", "open"),
        ("NVIDIA H200", "9.0", "open"),
        ("AD102 [GeForce RTX 4090]", "8.9", "open"),
        ("AD104GL [L4]", "8.9", "open"),
        ("NVIDIA L40S", "8.9", "open"),
        ("AD102GL [RTX 5000 Ada Generation]", "8.9", "open"),
        ("GA102 [GeForce RTX 3090]", "8.6", "open"),
        ("GA102GL [RTX A6000]", "8.6", "open"),
        ("GA100 [A100 PCIe 80GB]", "8.0", "open"),
        ("TU104GL [Tesla T4]", "7.5", "open"),
        ("TU102GL [Quadro RTX 5000]", "7.5", "open"),
        ("GV100GL [Tesla V100 PCIe 16GB]", "7.0", "proprietary"),
        ("GP102 [GeForce GTX 1080 Ti]", "6.1", "proprietary"),
        ("GP100GL [Tesla P100 PCIe 16GB]", "6.0", "proprietary"),
    ],
)
def test_the_card_decides_the_cuda_architecture_and_the_kernel_modules(
    card: str, capability: str, modules: str
) -> None:
    got = plan(UBUNTU_2404, gpu_card=card)
    assert got["compute_capability"] == capability
    assert got["cuda_architectures"] == capability.replace(".", "")
    assert got["kernel_modules"] == modules
    driver = "nvidia-open" if modules == "open" else "cuda-drivers"
    assert got["packages"] == ["linux-headers-6.8.0-49-generic", driver, "cuda-toolkit-12-8"]


def test_a_card_the_table_lacks_takes_the_operators_capability() -> None:
    assert plan(UBUNTU_2404, gpu_card="Some Future GPU")["compute_capability"] == ""
    got = plan(UBUNTU_2404, gpu_card="Some Future GPU", gpu_compute_capability="13.0")
    assert (got["cuda_architectures"], got["kernel_modules"]) == ("130", "open")


@pytest.mark.parametrize(
    ("facts", "repo"), [(UBUNTU_2204, "ubuntu2204"), (UBUNTU_2404, "ubuntu2404")]
)
def test_a_vm_gets_nvidias_repository_for_its_release(facts: dict[str, str], repo: str) -> None:
    got = plan(facts, gpu_card="GA102 [GeForce RTX 3090]")
    assert (got["action"], got["repo"]) == ("vm", repo)
    assert (
        got["repo_url"]
        == f"https://developer.download.nvidia.com/compute/cuda/repos/{repo}/x86_64/"
    )
    assert got["repo_key_url"].endswith(f"/{repo}/x86_64/3bf863cc.pub")
    assert got["packages"][0] == f"linux-headers-{facts['kernel']}"
    assert got["blacklist_nouveau"] and got["persistence_mode"] and got["reboot_allowed"]


def test_a_driver_branch_and_the_module_flavour_can_be_pinned() -> None:
    got = plan(UBUNTU_2204, gpu_card="GA102 [GeForce RTX 3090]", gpu_driver_branch="570")
    assert "nvidia-open-570" in got["packages"]
    got = plan(UBUNTU_2204, gpu_card="GA102 [GeForce RTX 3090]", gpu_kernel_modules="proprietary")
    assert "cuda-drivers" in got["packages"] and got["kernel_modules"] == "proprietary"


def test_a_vm_finds_its_card_with_lspci() -> None:
    lspci = [
        '01:00.0 "VGA compatible controller" "NVIDIA Corporation" "AD102 [GeForce RTX 4090]" '
        '-ra1 "NVIDIA Corporation" "Device 16f3"',
        '01:00.1 "Audio device" "NVIDIA Corporation" "AD102 High Definition Audio Controller"',
    ]
    got = plan(UBUNTU_2404, __gpu_lspci={"stdout": "\n".join(lspci), "stdout_lines": lspci})
    assert (got["action"], got["cuda_architectures"]) == ("vm", "89")


def test_a_vm_without_a_card_on_its_bus_installs_nothing() -> None:
    got = plan(UBUNTU_2404, __gpu_lspci={"stdout": "", "stdout_lines": []})
    assert got["action"] == "none" and got["packages"] == []
    assert "passed through" in got["why"]


def test_wsl_gets_the_toolkit_and_never_a_driver() -> None:
    got = plan(
        WSL,
        gpu_platform="wsl",
        __gpu_wsl_libcuda={"stat": {"exists": True}},
        __gpu_wsl_smi={"stdout_lines": ["NVIDIA GeForce RTX 4090"]},
    )
    assert (got["action"], got["repo"]) == ("wsl", "wsl-ubuntu")
    assert got["packages"] == ["cuda-toolkit-12-8"]
    assert got["driver_packages"] == []
    assert not any(re.match(p, pkg) for p in driver_patterns() for pkg in got["packages"])
    assert not got["blacklist_nouveau"] and not got["reboot_allowed"]
    assert got["kernel_modules"] == "" and got["cuda_architectures"] == "89"


def test_wsl_names_a_driver_package_an_operator_adds() -> None:
    got = plan(
        WSL,
        gpu_platform="wsl",
        gpu_extra_packages=["cuda-drivers", "cuda-12-8", "cuda-nsight-12-8"],
        __gpu_wsl_libcuda={"stat": {"exists": True}},
    )
    assert got["driver_packages"] == ["cuda-drivers", "cuda-12-8"]


def test_wsl_without_the_windows_driver_builds_for_the_cpu() -> None:
    got = plan(WSL, gpu_platform="wsl", __gpu_wsl_libcuda={"stat": {"exists": False}})
    assert got["action"] == "none" and got["packages"] == []
    assert "libcuda.so.1" in got["why"]


@pytest.mark.parametrize("overrides", [{"gpu_platform": "container"}, {"gpu_enabled": False}])
def test_containers_and_a_disabled_role_install_nothing(overrides: dict[str, Any]) -> None:
    got = plan(UBUNTU_2404, gpu_card="AD102 [GeForce RTX 4090]", **overrides)
    assert got["action"] == "none" and got["packages"] == [] and got["repo"] == ""
    if overrides.get("gpu_platform") == "container":
        assert got["why"].startswith("a container uses its host's driver")


def test_a_distribution_without_a_repository_has_none() -> None:
    got = plan({"distribution": "Fedora", "distribution_version": "41", "kernel": "6.11"},
               gpu_card="AD102 [GeForce RTX 4090]")  # fmt: skip
    assert got["repo"] == ""


def test_a_debian_point_release_finds_its_repository() -> None:
    # Real Debian 12 facts say 12.11 (seen on the test bed machine, not in recorded facts).
    facts = {"distribution": "Debian", "distribution_version": "12.11",
             "distribution_major_version": "12", "kernel": "6.1.0-40-amd64"}  # fmt: skip
    got = plan(facts, gpu_card="NVIDIA H200")
    assert got["repo"] == "debian12" and got["action"] == "vm"
    assert got["repo_url"].endswith("/debian12/x86_64/")


def test_a_vm_without_lspci_says_so() -> None:
    got = plan(UBUNTU_2404, __gpu_lspci={"rc": 2, "msg": "[Errno 2] No such file or directory"})
    assert got["action"] == "none" and "install pciutils or set gpu_card" in got["why"]


def native_smi(*lines: str, rc: int = 0, **extra: Any) -> dict[str, Any]:
    return {"rc": rc, "stdout": "\n".join(lines), "stdout_lines": list(lines), **extra}


def test_a_native_host_keeps_its_driver_and_gets_the_toolkit_only() -> None:
    got = plan(
        UBUNTU_2404,
        gpu_platform="native",
        __gpu_native_smi=native_smi("NVIDIA GeForce RTX 5090, 12.0, 575.57.08"),
    )
    assert (got["action"], got["repo"]) == ("native", "ubuntu2404")
    assert got["packages"] == ["cuda-toolkit-12-8"] and got["driver_packages"] == []
    assert (got["card"], got["cuda_architectures"]) == ("NVIDIA GeForce RTX 5090", "120")
    assert (got["driver_version"], got["driver_minimum"]) == ("575.57.08", "525.60.13")
    assert not got["blacklist_nouveau"] and not got["reboot_allowed"]
    assert got["kernel_modules"] == "" and got["nvcc"] == "/usr/local/cuda-12.8/bin/nvcc"


def test_a_native_host_names_a_driver_package_an_operator_adds() -> None:
    got = plan(
        UBUNTU_2204,
        gpu_platform="native",
        gpu_extra_packages=["nvidia-driver-570", "cuda-nsight-12-8"],
        __gpu_native_smi=native_smi("NVIDIA H200, 9.0, 570.124.06"),
    )
    assert got["driver_packages"] == ["nvidia-driver-570"] and got["repo"] == "ubuntu2204"


@pytest.mark.parametrize(
    ("smi", "said"),
    [
        (native_smi(rc=2, msg="[Errno 2] No such file or directory: b'nvidia-smi'"), "Errno 2"),
        (
            native_smi(
                "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
                "Make sure that the latest NVIDIA driver is installed and running.",
                rc=9,
            ),
            "couldn't communicate",
        ),
        (native_smi(), "no card listed"),
    ],
)
def test_a_native_host_without_a_driver_installs_nothing_and_says_why(
    smi: dict[str, Any], said: str
) -> None:
    got = plan(UBUNTU_2404, gpu_platform="native", __gpu_native_smi=smi)
    assert got["action"] == "none" and got["packages"] == [] and got["repo"] == ""
    assert said in got["why"] and "installs no driver on a native host" in got["why"]
    assert "Make sure" not in got["why"]  # one line: the first of what nvidia-smi said
