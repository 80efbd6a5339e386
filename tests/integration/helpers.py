"""What the integration tests do as an operator and as a LAN device: run `invoke`, run a
command on the test-bed host over SSH, curl from the LAN client's namespace."""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from llamavm import REPO_ROOT, paths
from llamavm.inputs import catalog
from llamavm.testbed import config, machine

INVOKE = Path(sys.executable).parent / "invoke"
TESTBED_CATALOG = REPO_ROOT / "config" / "models.testbed.yaml"
SHARE = paths.models()
FAILPOINTS = "/run/llamavm/failpoints.json"
#: The embedded VM inventory (a model VM and an NFS server VM), and how tests reach the VMs.
VM_INVENTORY = "local-vm"
VM_KEY = "/var/lib/llamavm/vm/id_ed25519"
VM_KNOWN_HOSTS = "/var/lib/llamavm/vm/known_hosts"


def invoke(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INVOKE), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


#: Marks a file a test put on the test bed as a stand-in (e.g. a recorded nvidia-smi); the
#: session start removes any left behind by an interrupted run, so provision never believes it.
STUB_MARK = "llamavm-test-stub"
STUBS = ("/usr/local/bin/nvidia-smi",)


def remove_stale_stubs() -> None:
    """Remove the test stand-ins an interrupted run left on the test bed."""
    for path in STUBS:
        q = shlex.quote(path)
        host_run(f"if grep -qs {shlex.quote(STUB_MARK)} {q}; then rm -f {q}; fi")


def host_run(command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a shell command as root on the test-bed host (over SSH, as an operator would)."""
    cfg, paths = config.load_config(), config.Paths.from_env()
    return subprocess.run(
        [*machine.ssh_base_command(cfg, paths), shlex.join(["sudo", "-n", "bash", "-c", command])],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def client_curl(url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return machine.client_run(
        ["curl", "-sS", "--max-time", str(timeout), "-o", "-", "-w", "\n%{http_code}", *args, url],
        capture_output=True,
        text=True,
    )


def lan_chat(base: str, content: str = "hi", max_tokens: int = 4,
             timeout: float = 60) -> tuple[str, str]:  # fmt: skip
    """A chat completion from the LAN client to `base` (http://HOST:PORT): (status, body)."""
    done = client_curl(
        f"{base}/v1/chat/completions",
        "-H", "Content-Type: application/json",
        "-d", json.dumps({"messages": [{"role": "user", "content": content}],
                          "max_tokens": max_tokens}),
        timeout=timeout,
    )  # fmt: skip
    body, code = done.stdout.rsplit("\n", 1)
    return code, body


def http_code(url: str, *args: str) -> int | None:
    """The HTTP status the LAN client gets, or None when the connection is refused."""
    result = client_curl(url, *args)
    if result.returncode != 0:
        return None
    return int(result.stdout.rsplit("\n", 1)[-1])


def url(host: str, model: catalog.Model, path: str = "/") -> str:
    return f"http://{host}:{model.port}{path}"


def running_servers() -> list[str]:
    return host_run("pgrep -x llama-server || true").stdout.split()


def active_units() -> list[str]:
    result = host_run(
        "systemctl list-units --state=active,activating --no-legend --plain 'llamavm-model-*' "
        "| cut -d' ' -f1"
    )
    return [u for u in result.stdout.split() if u]


def main_pid(unit: str) -> str:
    return host_run(f"systemctl show -p MainPID --value {unit}").stdout.strip()


def status() -> dict[str, Any]:
    result = invoke("status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return next(iter(json.loads(result.stdout).values()))


def set_failpoints(points: dict[str, Any]) -> None:
    body = shlex.quote(json.dumps(points))
    result = host_run(f"install -d -m 0755 /run/llamavm && umask 077 && echo {body} > {FAILPOINTS}")
    assert result.returncode == 0, result.stderr


def clear_failpoints() -> None:
    host_run(f"rm -f {FAILPOINTS}")


@contextlib.contextmanager
def port_opened(port: int) -> Iterator[None]:
    """Let the LAN reach `port` on the test-bed host for a while: the host's firewall (the
    expose role) refuses every port it doesn't know. No-op without the firewall's table."""
    tag = f"llamavm-it-{port}"
    added = (
        host_run(
            f"nft insert rule inet llamavm input tcp dport {port} accept comment '\"{tag}\"'"
        ).returncode
        == 0
    )
    try:
        yield
    finally:
        if added:
            host_run(
                f"nft -a list chain inet llamavm input | awk '/{tag}/ {{print $NF}}' | "
                "xargs -r -n1 nft delete rule inet llamavm input handle"
            )


def wait_for(predicate, timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def catalog_with(tmp_path: Path, extra_models: list[dict[str, Any]], **settings: Any) -> Path:
    """The test bed's catalog plus `extra_models` (and settings changes), as a file."""
    data = yaml.safe_load(TESTBED_CATALOG.read_text())
    data["models"] += extra_models
    data["settings"].update(settings)
    path = tmp_path / "models.extra.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def keyed_catalog_file(tmp_path: Path, **front_door: Any) -> Path:
    """The test bed's catalog with the API key policy on (and front-door changes), as a file."""
    data = yaml.safe_load(TESTBED_CATALOG.read_text())
    data["settings"]["api_key"] = {"policy": "required", "file": "/etc/llamavm/api-key"}
    data["settings"]["expose"]["front_door"].update(front_door)
    path = tmp_path / "models.keyed.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextlib.contextmanager
def keyed_testbed(tmp_path: Path, **front_door: Any) -> Iterator[tuple[Any, str]]:
    """The test bed provisioned with the key policy on, its default model serving:
    (catalog, provision's output). Provisioned back to its own catalog afterwards."""
    from llamavm.inputs import catalog

    path = keyed_catalog_file(tmp_path, **front_door)
    result = invoke("provision", "--catalog", str(path))
    try:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr
        cat = catalog.load(path)
        switched = invoke("switch", "--model", cat.default.name, "--catalog", str(path))
        assert switched.returncode == 0, switched.stdout + switched.stderr
        yield cat, result.stdout + result.stderr
    finally:
        clear_failpoints()
        restored = invoke("provision")
        assert restored.returncode == 0, restored.stdout[-4000:] + restored.stderr


def ssh_from_lan(vm: Any, command: str, *extra: str, timeout: float = 120) -> Any:
    """SSH to a VM's bridged address from the LAN client's namespace (`vm`: a VmSpec)."""
    return machine.client_run(
        ["ssh", "-i", VM_KEY, "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={VM_KNOWN_HOSTS}", "-o", "StrictHostKeyChecking=yes",
         "-o", "ConnectTimeout=10", *extra,
         f"{vm.admin_user}@{vm.network.ip}", command],
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # fmt: skip


def api_call(url: str, key: str | None, *args: str, timeout: float = 300) -> tuple[int, str]:
    """(HTTP status, body) of a request from the LAN client, with the key when one is given."""
    headers = ["-H", f"Authorization: Bearer {key}"] if key else []
    answer = client_curl(url, *headers, *args, timeout=timeout)
    assert answer.returncode == 0, answer.stderr
    body, code = answer.stdout.rsplit("\n", 1)
    return int(code), body


def api_post(url: str, key: str | None, body: Any = None, *args: str) -> tuple[int, str]:
    data = ["-H", "Content-Type: application/json", "-d", json.dumps(body or {})]
    return api_call(url, key, "-X", "POST", *data, *args)


@contextlib.contextmanager
def sampled(count: Callable[[], int], every: float = 0.05) -> Iterator[list[int]]:
    """`count()` sampled every `every` seconds in a thread while the block runs: the samples."""
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(count())
            time.sleep(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join(timeout=30)


#: Every endpoint of the control service that wants the key, with a body that works.
CONTROL_ENDPOINTS = [
    ("GET", "/models", None),
    ("GET", "/status", None),
    ("POST", "/switch", {"model": "qwen"}),
    ("POST", "/restart", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"model": "qwen", "messages": [{"role": "user",
                                                                    "content": "hi"}]}),
    ("POST", "/v1/completions", {"model": "qwen", "prompt": "hi", "max_tokens": 2}),
    ("POST", "/stop", None),
]  # fmt: skip
