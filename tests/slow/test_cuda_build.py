"""A real GGML_CUDA=ON build through the llama_cpp role on a GPU-less machine (marker `slow`).

Installs Debian's non-free nvidia-cuda-toolkit (11.8, ships cuBLAS; the nvcc under
/usr/local/cuda here has no cuBLAS), forces the CUDA backend for one architecture, and checks
that libggml-cuda was built, installed and linked, and that llama-server still starts and
answers /health (it logs that no CUDA device is present and falls back to the CPU).

About 16+ minutes of both cores; run alone:  pytest -m slow tests/slow/test_cuda_build.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from llamavm import REPO_ROOT
from llamavm.artifacts import source, tinymodel

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="installs packages and builds as another user"),
]

VENV_BIN = Path(sys.executable).parent
NONFREE_DROPIN = Path("/etc/apt/sources.list.d/llamavm-nonfree.sources")
# Debian's nvcc: the one with cuBLAS next to it.
NVCC = "/usr/bin/nvcc"
ARCH = "86-real"
BUILD_ROOT = Path(os.environ.get("LLAMAVM_IT_BUILD_ROOT", "/var/tmp/llamavm-it/build"))


def _debian_mirror() -> str:
    """The URI of the main Debian archive this machine already uses."""
    for path in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if path.is_file():
            for uri in re.findall(r"(?:URIs:|^deb)\s+(\S+)", path.read_text(), re.M):
                if "security" not in uri:
                    return uri
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def cuda_toolkit() -> str:
    """Debian's nvidia-cuda-toolkit, installed from non-free via an apt sources drop-in."""
    if not Path(NVCC).exists():
        NONFREE_DROPIN.write_text(
            "# Added by llamavm tests/slow/test_cuda_build.py: contrib, non-free (CUDA toolkit).\n"
            "Types: deb\n"
            f"URIs: {_debian_mirror()}\n"
            "Suites: bookworm bookworm-updates\n"
            "Components: contrib non-free non-free-firmware\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nvidia-cuda-toolkit"],
            check=True,
            env=env,
        )
    out = subprocess.run([NVCC, "--version"], capture_output=True, text=True, check=True).stdout
    assert "release" in out
    return NVCC


def test_cuda_build_links_ggml_cuda_and_serves_health(cuda_toolkit: str) -> None:
    archive = source.prepare()
    # Not pytest's work: its parents are 0700 and the server runs as nobody.
    work = Path(tempfile.mkdtemp(prefix="lvm-cuda-"))
    work.chmod(0o755)
    prefix = work / "llama.cpp"
    evars = {
        "llama_cpp_source_archive": str(archive),
        "llama_cpp_source_version": source.load_config().label,
        "llama_cpp_canary_model": str(tinymodel.canary()),
        "llama_cpp_prefix": str(prefix),
        "llama_cpp_build_root": str(BUILD_ROOT),
        "llama_cpp_hosts": "localhost",
        "llama_cpp_builder_hosts": "localhost",
        "llama_cpp_backend": "cuda",
        "llama_cpp_cuda_architectures": ARCH,
        "llama_cpp_cuda_compiler": cuda_toolkit,
        "ansible_become_method": "ansible.builtin.su",
        "ansible_python_interpreter": sys.executable,
    }
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible" / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
    }
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            str(VENV_BIN / "ansible-playbook"),
            "-c",
            "local",
            "-i",
            "localhost,",
            str(REPO_ROOT / "ansible" / "playbooks" / "llama_cpp.yml"),
            "-e",
            json.dumps(evars),
        ],
        cwd=REPO_ROOT / "ansible",
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    print(f"CUDA converge: {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr

    current = prefix / "current"
    assert os.readlink(current).startswith(f"{source.load_config().label}-cuda-")
    info = json.loads((current / "BUILD-INFO.json").read_text())
    assert info["key_inputs"]["flags"]["GGML_CUDA"] == "ON"
    assert info["key_inputs"]["flags"]["CMAKE_CUDA_ARCHITECTURES"] == ARCH
    assert info["key_inputs"]["flags"]["GGML_CUDA_FA"] == "ON"

    libs = sorted(p.name for p in (current / "lib").iterdir())
    assert any(n.startswith("libggml-cuda.so") for n in libs), libs
    ldd = subprocess.run(
        ["ldd", str(current / "bin" / "llama-server")], capture_output=True, text=True, check=True
    ).stdout
    assert "not found" not in ldd, ldd
    assert re.search(r"libggml-cuda\.so\S* => \S+/current/bin/\.\./lib/", ldd), ldd
    assert "libcublas" in ldd, ldd

    model = tinymodel.write(tinymodel.TinySpec(name="cuda-smoke"), work / "tiny.gguf")
    model.chmod(0o644)
    log = (work / "server.log").open("w")
    server = subprocess.Popen(
        [
            "runuser",
            "-u",
            "nobody",
            "--",
            str(current / "bin" / "llama-server"),
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            "18094",
            "-c",
            "256",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        status = 0
        for _ in range(120):
            try:
                with urllib.request.urlopen("http://127.0.0.1:18094/health", timeout=2) as r:
                    status = r.status
                    break
            except OSError:
                time.sleep(0.5)
        text = (work / "server.log").read_text()
        assert status == 200, text[-3000:]
        assert re.search(r"CUDA|cuda", text), text[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
