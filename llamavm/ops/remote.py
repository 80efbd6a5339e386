"""One SSH call per host: run llamavm-switch on the hosts of an inventory.

Connection settings come from the inventory itself (`ansible-inventory --list`), so whatever
Ansible uses to reach a host — address, user, port, key, extra SSH options — is what we use.
`ansible-inventory` takes about 0.4 s to start, most of a quick `invoke switch` that isn't the
model load: the hosts it yields are kept (0600, root's cache) under a digest of every inventory
file, ansible.cfg and the ANSIBLE_* environment, and asked again when any of them changes.
Inventories with plugins, scripts or vaulted files are asked every time.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamavm import REPO_ROOT, paths
from llamavm.errors import LlamavmError
from llamavm.host import EXIT_RUNNING, EXIT_UNKNOWN

GROUP = "llamavm_hosts"
#: After the session that ran a transaction broke: how long to keep trying to reach the host.
RECONNECT_S = 180.0
#: How much of a streamed command's stderr is kept (to tell an SSH failure apart).
STDERR_TAIL_LINES = 40


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    user: str | None
    port: int | None
    key: str | None
    ssh_args: tuple[str, ...]
    #: How a command reaches the host when not over SSH: a command it follows (a Compose
    #: project's `docker exec ... llamavm-switchd`, which runs it as that container's root).
    via: tuple[str, ...] = ()
    #: Where the API key is read on the host, when not at the catalog's path (a Compose
    #: project's switchd container sees the project's key file elsewhere).
    key_file: str | None = None

    def ssh_command(self, remote: list[str], tty: bool = False) -> list[str]:
        if self.via:
            return [*self.via, *(remote[2:] if remote[:2] == ["sudo", "-n"] else remote)]
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
        # A dead peer (no RST) is noticed within 15 s, not at the TCP timeout.
        cmd += ["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if tty:
            cmd.append("-t")
        if self.key:
            cmd += ["-i", self.key]
        if self.port:
            cmd += ["-p", str(self.port)]
        cmd += list(self.ssh_args)
        target = f"{self.user}@{self.address}" if self.user else self.address
        return [*cmd, target, "--", shlex.join(remote)]


def inventory_data(inventory: Path) -> dict[str, Any]:
    """`ansible-inventory --list` of `inventory`: groups and every host's merged variables."""
    tool = Path(sys.executable).parent / "ansible-inventory"
    run = subprocess.run(
        [str(tool), "-i", str(inventory), "--list"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT / "ansible",
        check=False,
    )
    if run.returncode != 0:
        raise LlamavmError(f"{inventory}: ansible-inventory failed: {run.stderr.strip()[:300]}")
    data = json.loads(run.stdout)
    return data if isinstance(data, dict) else {}


def inventory_data_cached(inventory: Path) -> dict[str, Any]:
    """inventory_data, kept for a static inventory under the digest of its files (as `hosts`
    keeps its hosts): asked again when a file, ansible.cfg or an ANSIBLE_* variable changes."""
    digest = _static_digest(inventory)
    cache = _cache_dir() / f"{digest}.data.json" if digest else None
    if cache is not None:
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and data:
            return data
    data = inventory_data(inventory)
    if cache is not None:
        _write(cache, data)
    return data


def model_hosts(
    data: dict[str, Any], inventory: Path, only: str | None = None, *, also: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    """The model hosts of an inventory — the one walk of them: {name: its variables} for the
    hosts of GROUP and of its children, in inventory order, each once (or just `only`), then
    those of the groups `also` names that are not among them. `data` is `inventory_data`'s
    answer. One-line errors when GROUP has no host, or `only` is not one of GROUP's."""
    names = group_hosts(data, GROUP)
    if not names:
        raise LlamavmError(f"{inventory}: no hosts in group {GROUP} — add your model hosts there")
    if only:
        names = _only(names, inventory, only)
    for group in also:
        names += [h for h in group_hosts(data, group) if h not in names]
    hostvars = data.get("_meta", {}).get("hostvars", {})
    return {name: hostvars.get(name, {}) for name in names}


def hosts(inventory: Path, only: str | None = None) -> list[Host]:
    """The hosts of GROUP in `inventory` (or just `only`)."""
    digest = _static_digest(inventory)
    cache = _cache_dir() / f"{digest}.json" if digest else None
    if cache is not None:
        try:
            found = [
                Host(**{**h, "ssh_args": tuple(h["ssh_args"]), "via": tuple(h.get("via", ()))})
                for h in _read(cache)
            ]
        except (OSError, ValueError, TypeError, KeyError):
            found = None
        if found is not None:
            return _only_hosts(found, inventory, only)
    data = inventory_data(inventory)
    found = [host_from_vars(name, hv) for name, hv in model_hosts(data, inventory).items()]
    if cache is not None:
        _write(cache, [{**h.__dict__, "ssh_args": list(h.ssh_args)} for h in found])
    return _only_hosts(found, inventory, only)


def _only_hosts(found: list[Host], inventory: Path, only: str | None) -> list[Host]:
    if only is None:
        return found
    picked = _only([h.name for h in found], inventory, only)
    return [h for h in found if h.name in picked]


def _only(names: list[str], inventory: Path, only: str) -> list[str]:
    """[only], or a one-line error naming GROUP's hosts when it is not one of `names`."""
    if only not in names:
        raise LlamavmError(f"{inventory}: no host {only!r} in {GROUP} — hosts: {', '.join(names)}")
    return [only]


#: What makes an inventory answer differently with the same files.
_DYNAMIC = (b"$ANSIBLE_VAULT", b"plugin:", b"lookup(", b"query(")


def _cache_dir() -> Path:
    return paths.inventories()


#: The script the local inventories share (a function of llamavm's folders only).
_LOCAL_PATHS = REPO_ROOT / "inventories" / "local" / "paths.py"
#: The module it runs (read here by path: remote imports nothing of the test bed).
_LOCAL_INV = REPO_ROOT / "llamavm" / "testbed" / "localinv.py"


def _static_digest(inventory: Path) -> str | None:
    """A digest of everything `ansible-inventory` reads for a static inventory; None when
    the inventory could say something else next time (a plugin, a script, a vault). The
    local inventories' paths.py (llamavm/testbed/localinv.py) is static given llamavm's folders."""
    files = sorted(p for p in inventory.rglob("*") if p.is_file()) if inventory.is_dir() else []
    if inventory.is_file():
        files = [inventory]
    digest = hashlib.sha256()
    for path in [*files, REPO_ROOT / "ansible" / "ansible.cfg"]:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if path in files and path.resolve() == _LOCAL_PATHS:
            digest.update(_LOCAL_PATHS.read_bytes() + _LOCAL_INV.read_bytes())
            digest.update(f"{paths.cache()}\0{paths.state()}\0".encode())
        elif path in files and (os.access(path, os.X_OK) or any(w in data for w in _DYNAMIC)):
            return None
        digest.update(f"{path}\0{len(data)}\0".encode() + data)
    for key in sorted(k for k in os.environ if k.startswith("ANSIBLE_")):
        digest.update(f"{key}={os.environ[key]}\0".encode())
    digest.update(f"{GROUP}\0{sys.executable}".encode())
    return digest.hexdigest()[:32]


def _read(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data:
        raise ValueError("empty")
    return data


def _write(path: Path, entries: list[dict[str, Any]] | dict[str, Any]) -> None:
    """Keep the hosts for next time; a cache that can't be written is no error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(entries, handle)
        os.replace(tmp, path)
    except OSError:
        pass


def group_hosts(data: dict[str, Any], group: str) -> list[str]:
    """The hosts of `group` and of its children (depth first), in inventory order, each once."""
    entry = data.get(group, {})
    names = list(entry.get("hosts", []))
    for child in entry.get("children", []):
        names += [n for n in group_hosts(data, child) if n not in names]
    return names


def host_from_vars(name: str, hv: dict[str, Any]) -> Host:
    args: list[str] = []
    for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        if hv.get(key):
            args += shlex.split(str(hv[key]))
    port = hv.get("ansible_port") or hv.get("ansible_ssh_port")
    return Host(
        name=name,
        address=str(hv.get("ansible_host", name)),
        user=hv.get("ansible_user"),
        port=int(port) if port else None,
        key=hv.get("ansible_ssh_private_key_file"),
        ssh_args=tuple(args),
    )


def run(
    host: Host, remote: list[str], *, stream: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `remote` as root on `host`. With `stream`, its stderr (progress) is relayed to ours
    line by line as it comes, and its tail kept (so an SSH failure can be told apart); without,
    captured. No exceptions: an SSH failure is returncode 255 (or negative when the ssh process
    was killed)."""
    argv = host.ssh_command(["sudo", "-n", *remote])
    if not stream:
        try:
            return _transport(
                host,
                subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout),
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(remote, 255, "", f"timed out after {timeout}s")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    out: list[str] = []

    def relay() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            tail.append(line)
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line)
                sys.stderr.flush()

    def collect() -> None:
        out.append(proc.stdout.read())  # type: ignore[union-attr]

    readers = [
        threading.Thread(target=relay, daemon=True),
        threading.Thread(target=collect, daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        tail.append(f"timed out after {timeout}s")
        code = 255
    except BaseException:  # an interrupt: ssh goes with us (the transaction goes on there)
        proc.kill()
        proc.wait()
        raise
    for reader in readers:
        reader.join(timeout=5)
    return _transport(host, subprocess.CompletedProcess(remote, code, "".join(out), "".join(tail)))


#: What the engine's CLI says when the switchd container can't be reached right now: a
#: transport failure, as an SSH session's 255 is (the outcome is asked again).
_EXEC_UNREACHABLE = re.compile(
    r"Cannot connect to the Docker daemon|is not running|No such container|"
    r"connection refused|Error response from daemon: Container .* is restarting"
)


def _transport(
    host: Host, proc: subprocess.CompletedProcess[str]
) -> subprocess.CompletedProcess[str]:
    """`proc` with an unreachable switchd container reported as SSH reports a broken session."""
    if host.via and proc.returncode not in (0, 255) and _EXEC_UNREACHABLE.search(proc.stderr or ""):
        proc.returncode = 255
    return proc


def _answer(stdout: str | None) -> dict[str, Any] | None:
    """The JSON object on the last line of `stdout`, if there is one."""
    lines = (stdout or "").strip().splitlines()
    if not lines:
        return None
    try:
        answer = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return answer if isinstance(answer, dict) else None


#: What ssh says when it never got a session: no command ran on the host.
_NEVER_CONNECTED = re.compile(
    r"ssh: connect to host .* port \d+: |ssh: Could not resolve hostname |"
    r"Permission denied \(|Host key verification failed|kex_exchange_identification: "
)


def never_connected(proc: subprocess.CompletedProcess[str]) -> bool:
    """True when ssh failed before a session existed (refused, timed out, no route, unknown
    name, key refused): the remote command never started. Reads ssh's stderr (captured, or
    the tail kept while it was relayed)."""
    return proc.returncode == 255 and bool(_NEVER_CONNECTED.search(proc.stderr or ""))


def _ssh_failed(host: Host, proc: subprocess.CompletedProcess[str]) -> LlamavmError:
    detail = (proc.stderr or "").strip().splitlines()
    if host.via:
        return LlamavmError(
            f"{host.name}: the project's switchd container did not answer "
            f"({detail[-1] if detail else 'no answer'}) — check the engine runs, and run invoke "
            "provision"
        )
    return LlamavmError(
        f"{host.name}: SSH to {host.address} failed ({detail[-1] if detail else 'no answer'}) — "
        "check the host is up (invoke doctor) and the inventory's connection settings"
    )


def query(host: Host, args: list[str]) -> dict[str, Any]:
    """A read-only llamavm-switch command (status, check): its JSON answer."""
    proc = run(host, [switch_path(), *args, "--json"], stream=False, timeout=120)
    answer = _answer(proc.stdout)
    if answer is not None:
        return answer
    if proc.returncode == 255:
        raise _ssh_failed(host, proc)
    if proc.returncode == 127 or "command not found" in (proc.stderr or ""):
        raise LlamavmError(f"{host.name}: llamavm-switch is not installed — run invoke provision")
    raise LlamavmError(
        f"{host.name}: llamavm-switch answered no JSON (exit {proc.returncode}): "
        f"{(proc.stderr or proc.stdout or '').strip()[-300:]} — run invoke provision"
    )


def transaction(
    host: Host, op: str, args: list[str], *, stream: bool = True
) -> tuple[int, dict[str, Any]]:
    """Run a switch/stop transaction on `host`: (exit code, its recorded outcome).

    The transaction runs detached on the host. When the SSH session breaks before the outcome
    arrives, ask the host for that transaction's outcome (it completes or rolls back on its own)
    until it is known; exit code 5 only when the host can't be asked at all.
    """
    tx = secrets.token_hex(6)
    try:
        proc = run(host, [switch_path(), op, *args, "--tx", tx, "--json"], stream=stream)
    except KeyboardInterrupt:
        raise LlamavmError(
            f"{host.name}: interrupted here — transaction {tx} goes on on the host and completes "
            "or rolls back by itself; 'invoke status' shows how it ends",
            code=130,
        ) from None
    answer = _answer(proc.stdout)
    if answer is not None and "code" in answer:
        return int(answer["code"]), answer
    if never_connected(proc):
        # Nothing started there: no outcome to wait for (the reconnect window is for sessions
        # that broke after the transaction began).
        raise _ssh_failed(host, proc)
    if proc.returncode == 127 or "command not found" in (proc.stderr or ""):
        raise LlamavmError(f"{host.name}: llamavm-switch is not installed — run invoke provision")
    print(
        f"llamavm: {host.name}: the session ended before {op} reported (exit "
        f"{proc.returncode}); asking the host how transaction {tx} ended",
        file=sys.stderr,
        flush=True,
    )
    return outcome(host, tx, stream=stream)


def outcome(
    host: Host, tx: str, *, stream: bool = True, give_up_s: float = RECONNECT_S
) -> tuple[int, dict[str, Any]]:
    """The recorded outcome of transaction `tx` on `host`, waiting while it still runs."""
    last_contact = time.monotonic()
    delay = 1.0
    while True:
        proc = run(
            host,
            [switch_path(), "result", tx, "--wait", "60", "--json"],
            stream=stream,
            timeout=180,
        )
        answer = _answer(proc.stdout)
        if answer is not None and "code" in answer:
            last_contact = time.monotonic()
            code = int(answer["code"])
            if code != EXIT_RUNNING:
                answer["reconnected"] = True
                return code, answer
            continue
        if proc.returncode != 255 and proc.returncode >= 0:  # reached, but no answer
            raise LlamavmError(
                f"{host.name}: llamavm-switch answered no JSON (exit {proc.returncode}): "
                f"{(proc.stdout or '').strip()[-200:]!r} — run invoke provision to reinstall it"
            )
        if time.monotonic() - last_contact > give_up_s:
            return EXIT_UNKNOWN, {
                "ok": False,
                "code": EXIT_UNKNOWN,
                "tx": tx,
                "error": f"lost the connection to {host.name} during transaction {tx} and could "
                f"not reach it again for {give_up_s:.0f}s: the outcome is unknown — run "
                "'invoke status' when the host is back",
            }
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


def switch_path() -> str:
    """Where llamavm-switch is on every host (the contract's paths.switch)."""
    from llamavm.artifacts import contract  # the contract builder (VRAM, GGUF): only where asked

    return f"{contract.load_host_config().bin_dir}/{contract.SWITCH_NAME}"
