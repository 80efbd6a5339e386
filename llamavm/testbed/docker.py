"""A real container engine for the Compose tests and bench (tests/integration/test_compose.py,
bench/compose.py): Debian's docker.io and docker-compose, dockerd started by hand (this machine
has no systemd) with a data root and a socket of its own, and the base image made from the test
bed's Debian rootfs — no registry is reachable here, and that rootfs has the build tools
already."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from llamavm import paths
from llamavm.testbed import config

RUN = Path("/run/llamavm-docker")
SOCKET = RUN / "docker.sock"
HOST = f"unix://{SOCKET}"
DATA = paths.state() / "docker"
LOG = DATA.parent / "docker.log"
#: The base image inventories/local-compose builds on (llamavm_compose_build_image).
BASE = "llamavm-test/debian:12"
PACKAGES = ("docker.io", "docker-compose")


def docker(
    *args: str, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "-H", HOST, *args], capture_output=True, text=True,
                          timeout=timeout, check=check)  # fmt: skip


def _answers() -> bool:
    if not SOCKET.exists():
        return False
    return docker("version", "--format", "{{.Server.Version}}", check=False).returncode == 0


def install() -> None:
    missing = [p for p in PACKAGES if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True, check=False
    ).stdout != "install ok installed"]  # fmt: skip
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       check=True, env=env, capture_output=True, timeout=900)  # fmt: skip


def start() -> subprocess.Popen[bytes] | None:
    """dockerd on its own socket (None: one answers there already)."""
    if _answers():
        return None
    RUN.mkdir(parents=True, exist_ok=True)
    DATA.mkdir(parents=True, exist_ok=True)
    # No iptables rules on this machine: published ports go through docker-proxy, and the
    # containers need no way out (the build has everything in its context and base image).
    cmd = ["dockerd", "--host", HOST, "--data-root", str(DATA), "--exec-root", str(RUN / "exec"),
           "--pidfile", str(RUN / "docker.pid"), "--iptables=false", "--ip-masq=false",
           "--storage-driver", "overlay2"]  # fmt: skip
    with LOG.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not _answers():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"dockerd did not come up; see {LOG}")
        time.sleep(0.5)
    return proc


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def restart() -> subprocess.Popen[bytes] | None:
    """Stop the engine that answers on SOCKET (whoever started it: its pidfile) and start it
    again — as a host's engine restarts under a project."""
    pidfile = RUN / "docker.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if pid:
        os.kill(pid, 15)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    return start()


def base_image() -> str:
    """BASE, imported once from the test bed's cached rootfs (docs and locales left out)."""
    if docker("image", "inspect", BASE, check=False).returncode == 0:
        return BASE
    cfg, paths = config.load_config(), config.Paths.from_env()
    root = paths.rootfs(cfg.rootfs_key)
    tar = subprocess.Popen(
        ["tar", "-C", str(root), "--exclude=./usr/share/doc", "--exclude=./usr/share/locale",
         "--exclude=./usr/share/man", "--exclude=./var/cache/apt", "-c", "."],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    imported = subprocess.run(["docker", "-H", HOST, "import", "-", BASE], stdin=tar.stdout,
                              capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    tar.wait()
    if imported.returncode != 0:
        raise RuntimeError(f"docker import of {root} failed: {imported.stderr}")
    return BASE


def available() -> str | None:
    """Why the engine can't run here (None: it can)."""
    if os.geteuid() != 0:
        return "the engine needs root"
    if shutil.which("apt-get") is None and shutil.which("dockerd") is None:
        return "no dockerd and no apt-get to install it"
    return None


#: The Compose inventory of the tests and bench, and the controller's address on the test
#: bed's LAN, where the project publishes its ports (llamavm_compose_bind_address).
INVENTORY = "local-compose"
ADDRESS = "10.213.0.1"


def project(name: str = INVENTORY, address: str = ADDRESS) -> tuple[Any, Any]:
    """(the engine's client for inventory `name`'s Compose project, the inventory's catalog),
    with the base image made (the engine is up)."""
    from llamavm.inputs import catalog, inventory
    from llamavm.platforms.compose import site as site_mod
    from llamavm.platforms.compose.engine import Engine

    base_image()
    inv = inventory.resolve(name)
    cat = catalog.load(catalog.catalog_path(None, inv.catalog))
    return Engine(site_mod.site(inv, cat, address)), cat
