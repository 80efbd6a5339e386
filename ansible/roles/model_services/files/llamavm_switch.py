#!/usr/bin/python3
"""llamavm-switch: swap the model a llamavm host serves — checked, health-gated, transactional.

Installed on every host by the model_services role as /usr/local/bin/llamavm-switch; `invoke
switch` runs it over one SSH call. Python standard library only (hosts have no venv).

    llamavm-switch switch NAME [--json]   serve NAME (name or alias); roll back on any failure
    llamavm-switch stop [--json]          stop whatever model runs
    llamavm-switch status [--json]        active model, health, uptime, load times, GPU memory
    llamavm-switch check NAME [--json]    the pre-switch checks alone, nothing stopped

Exit codes: 0 done (or nothing to do), 1 the switch failed and was rolled back, 2 refused
before anything was stopped (unknown model, missing/unreadable/corrupt GGUF, size or sha256
mismatch, over the VRAM budget), 3 the lock could not be taken, 4 rollback failed too.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pwd
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CATALOG = Path(os.environ.get("LLAMAVM_HOST_CATALOG", "/etc/llamavm/catalog.json"))
STATE = Path(os.environ.get("LLAMAVM_HOST_STATE", "/var/lib/llamavm/state.json"))
LOCK = Path(os.environ.get("LLAMAVM_HOST_LOCK", "/run/llamavm/switch.lock"))
LOCK_TIMEOUT_S = float(os.environ.get("LLAMAVM_LOCK_TIMEOUT_S", "900"))
#: A learned health timeout is never shorter than this.
TIMEOUT_FLOOR_S = 20.0
#: ... and is this many times the slowest recent load.
TIMEOUT_FACTOR = 3.0
HISTORY = 10

EXIT_FAILED, EXIT_REFUSED, EXIT_LOCK, EXIT_ROLLBACK_FAILED = 1, 2, 3, 4


class SwitchError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


# --- small helpers ----------------------------------------------------------------------------


def progress(text: str) -> None:
    print(f"llamavm-switch: {text}", file=sys.stderr, flush=True)


def systemctl(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=check)


def unit_props(unit: str, *names: str) -> dict[str, str]:
    out = systemctl("show", unit, "--property=" + ",".join(names)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal_tail(unit: str, lines: int = 25) -> str:
    run = subprocess.run(
        ["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat"],
        capture_output=True,
        text=True,
    )
    return run.stdout.strip()


def load_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def http(
    url: str, body: dict[str, Any] | None = None, key: str | None = None, timeout: float = 5
) -> tuple[int, Any]:
    """A minimal HTTP/1.0 client for the local server (urllib costs 50 ms of imports a run).

    Raises OSError when nothing answers (refused, timed out, reset).
    """
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    payload = json.dumps(body).encode() if body is not None else b""
    head = [
        f"{'POST' if body is not None else 'GET'} /{path} HTTP/1.0",
        f"Host: {hostport}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
    ]
    if key:
        head.append(f"Authorization: Bearer {key}")
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    header, _, content = raw.partition(b"\r\n\r\n")
    try:
        status = int(header.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise ConnectionError(f"not an HTTP answer from {url}") from None
    try:
        return status, json.loads(content or b"null")
    except json.JSONDecodeError:
        return status, content.decode(errors="replace")


# --- the catalog --------------------------------------------------------------------------------


class Catalog:
    def __init__(self, path: Path = CATALOG) -> None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise SwitchError(
                f"{path} not found — run 'invoke provision' to install the model services",
                EXIT_REFUSED,
            ) from None
        self.settings: dict[str, Any] = data["settings"]
        self.models: list[dict[str, Any]] = data["models"]

    def resolve(self, name: str) -> dict[str, Any]:
        for model in self.models:
            if name == model["name"] or name in model.get("aliases", []):
                return model
        known = ", ".join(m["name"] for m in self.models)
        raise SwitchError(f"no model named {name!r} — known models: {known}", EXIT_REFUSED)

    def gguf_path(self, model: dict[str, Any]) -> Path:
        return Path(self.settings["share_path"]) / model["gguf"]

    def address(self, model: dict[str, Any]) -> str:
        bind = self.settings.get("bind_address", "0.0.0.0")
        host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
        return f"http://{host}:{model['port']}"

    def api_key(self) -> str | None:
        api = self.settings.get("api_key", {})
        if api.get("policy") != "required":
            return None
        try:
            return Path(api["file"]).read_text().strip()
        except OSError as exc:
            raise SwitchError(f"cannot read the API key {api['file']}: {exc.strerror}") from None


def unit_states(catalog: Catalog) -> dict[str, str]:
    """ActiveState of every model unit, in one systemctl call."""
    units = [m["unit"] for m in catalog.models]
    out = systemctl("show", "--property=Id,ActiveState", *units).stdout
    states: dict[str, str] = {}
    for block in out.split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in props:
            states[props["Id"]] = props.get("ActiveState", "unknown")
    return states


def active_models(catalog: Catalog) -> list[dict[str, Any]]:
    """Models whose unit is active, activating, reloading or deactivating right now."""
    states = unit_states(catalog)
    busy = ("active", "activating", "reloading", "deactivating")
    return [m for m in catalog.models if states.get(m["unit"]) in busy]


# --- checks before anything is stopped ----------------------------------------------------------

_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def check_gguf_header(path: Path, size: int) -> None:
    """Walk the GGUF header (metadata and tensor table) and check it fits in the file."""
    with path.open("rb") as handle:

        def read(n: int) -> bytes:
            chunk = handle.read(n)
            if len(chunk) != n:
                raise ValueError("file ends inside the header")
            return chunk

        def u64() -> int:
            return struct.unpack("<Q", read(8))[0]

        def skip_string() -> None:
            length = u64()
            if length > 1 << 24:
                raise ValueError("implausible string length")
            handle.seek(length, os.SEEK_CUR)

        def skip_value(kind: int) -> None:
            if kind in _GGUF_SCALAR:
                read(_GGUF_SCALAR[kind])
            elif kind == 8:
                skip_string()
            elif kind == 9:
                item, count = struct.unpack("<I", read(4))[0], u64()
                if count > 1 << 28:
                    raise ValueError("implausible array length")
                if item in _GGUF_SCALAR:
                    handle.seek(_GGUF_SCALAR[item] * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip_value(item)
            else:
                raise ValueError(f"unknown metadata type {kind}")

        if read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        version = struct.unpack("<I", read(4))[0]
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = u64(), u64()
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise ValueError("implausible tensor or key count")
        alignment = 32
        for _ in range(n_kv):
            key_len = u64()
            key = read(key_len).decode(errors="replace")
            kind = struct.unpack("<I", read(4))[0]
            if key == "general.alignment" and kind == 4:
                alignment = struct.unpack("<I", read(4))[0]
            else:
                skip_value(kind)
        last_offset = 0
        for _ in range(n_tensors):
            skip_string()
            n_dims = struct.unpack("<I", read(4))[0]
            if n_dims > 8:
                raise ValueError("implausible tensor rank")
            read(8 * n_dims + 4)
            last_offset = max(last_offset, u64())
        data_start = (handle.tell() + alignment - 1) // alignment * alignment
        if data_start + last_offset >= size and n_tensors:
            raise ValueError("tensor data is cut short (truncated file)")


def sha256_cached(path: Path, stat: os.stat_result) -> str:
    """SHA-256 of a (large) file, remembered per (inode, size, mtime) so it is paid once."""
    state = load_json(STATE, {})
    key = f"{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"
    cached = state.get("sha256", {}).get(str(path))
    if cached and cached.get("key") == key:
        return str(cached["sha256"])
    progress(f"computing sha256 of {path} ({stat.st_size / 2**30:.1f} GiB), once")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    state.setdefault("sha256", {})[str(path)] = {"key": key, "sha256": value}
    save_json(STATE, state)
    return value


def readable_by(path: Path, user: str) -> bool:
    """Can `user` (the service user) read `path`? Checked by mode bits, as root can read all."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return os.access(path, os.R_OK)
    groups = {entry.pw_gid, *os.getgrouplist(user, entry.pw_gid)}
    for part in [*reversed(path.parents), path]:
        st = part.stat()
        # Directories need search permission, the file itself read permission.
        bits = (0o100, 0o010, 0o001) if part != path else (0o400, 0o040, 0o004)
        if st.st_uid == entry.pw_uid:
            allowed = st.st_mode & bits[0]
        elif st.st_gid in groups:
            allowed = st.st_mode & bits[1]
        else:
            allowed = st.st_mode & bits[2]
        if not allowed:
            return False
    return True


def preflight(catalog: Catalog, model: dict[str, Any]) -> None:
    """Everything that can be known before stopping the active model."""
    path = catalog.gguf_path(model)
    name = model["name"]
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise SwitchError(
            f"{name}: GGUF {path} not found — check the catalog's gguf path and the model share",
            EXIT_REFUSED,
        ) from None
    except PermissionError:
        raise SwitchError(
            f"{name}: GGUF {path} not reachable (permission denied)", EXIT_REFUSED
        ) from None
    user = catalog.settings.get("service_user", "llama")
    try:
        with path.open("rb"):
            pass
        if not readable_by(path, user):
            raise PermissionError(errno.EACCES, "not readable by the service user")
    except PermissionError:
        raise SwitchError(
            f"{name}: GGUF {path} is not readable by the service user {user} — "
            "make it world-readable (chmod a+r) on the share",
            EXIT_REFUSED,
        ) from None
    if model.get("size_bytes") and stat.st_size != model["size_bytes"]:
        raise SwitchError(
            f"{name}: GGUF {path} is {stat.st_size} bytes, the catalog says {model['size_bytes']} "
            "— re-download the file or fix size_bytes",
            EXIT_REFUSED,
        )
    try:
        check_gguf_header(path, stat.st_size)
    except (ValueError, struct.error, OSError) as exc:
        raise SwitchError(
            f"{name}: GGUF {path} is corrupt ({exc}) — re-download or re-convert it",
            EXIT_REFUSED,
        ) from None
    if model.get("sha256") and sha256_cached(path, stat) != model["sha256"]:
        raise SwitchError(
            f"{name}: GGUF {path} does not match the catalog's sha256 — "
            "re-download the file or fix sha256",
            EXIT_REFUSED,
        )
    vram = model.get("vram") or {}
    if vram.get("verdict") == "over budget":
        raise SwitchError(
            f"{name}: needs {vram.get('total_mib', 0):.0f} MiB of GPU memory, the budget leaves "
            f"{vram.get('available_mib', 0):.0f} MiB — lower ctx_size or raise n_cpu_moe"
            + (
                f" (n_cpu_moe: {vram['suggested_n_cpu_moe']} fits)"
                if vram.get("suggested_n_cpu_moe") is not None
                else ""
            ),
            EXIT_REFUSED,
        )


# --- GPU --------------------------------------------------------------------------------------


def gpu_memory() -> list[dict[str, int]]:
    """Used/total MiB per GPU from nvidia-smi; empty without one."""
    try:
        run = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in run.stdout.splitlines():
        with contextlib.suppress(ValueError):
            used, total = (int(x) for x in line.split(","))
            gpus.append({"used_mib": used, "total_mib": total})
    return gpus


def wait_vram_released(baseline: list[dict[str, int]], timeout: float = 30) -> None:
    if not baseline:
        return
    idle = int(os.environ.get("LLAMAVM_IDLE_VRAM_MIB", "1024"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gpus = gpu_memory()
        if all(g["used_mib"] <= idle for g in gpus):
            return
        time.sleep(0.2)
    progress("GPU memory still in use after the old model stopped; continuing")


# --- serving ------------------------------------------------------------------------------------


def learned_timeout(model: dict[str, Any], state: dict[str, Any]) -> float:
    ceiling = float(model["health_timeout_s"])
    loads = state.get("loads", {}).get(model["name"], [])
    if not loads:
        return ceiling
    return min(ceiling, max(TIMEOUT_FLOOR_S, TIMEOUT_FACTOR * max(loads)))


def stop_model(model: dict[str, Any]) -> None:
    pid = unit_props(model["unit"], "MainPID").get("MainPID", "0")
    systemctl("stop", model["unit"])
    # systemctl stop returns when the unit is inactive; make sure the process is really gone.
    deadline = time.monotonic() + 30
    while pid not in ("", "0") and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def start_and_wait(catalog: Catalog, model: dict[str, Any], timeout: float) -> float:
    """Start `model` and wait until it is healthy; return the seconds it took."""
    unit = model["unit"]
    began = time.monotonic()
    systemctl("reset-failed", unit)
    started = systemctl("start", "--no-block", unit)
    if started.returncode != 0:
        raise SwitchError(f"{model['name']}: systemctl start failed: {started.stderr.strip()}")
    url = catalog.address(model) + "/health"
    last_note = last_props = 0.0
    while True:
        elapsed = time.monotonic() - began
        healthy = False
        with contextlib.suppress(OSError):
            healthy = http(url, timeout=2)[0] == 200
        # systemctl costs a fork: ask it when the server looks ready, else a few times a second.
        if healthy or elapsed - last_props >= 0.25:
            last_props = elapsed
            props = unit_props(unit, "ActiveState", "SubState", "Result")
            state = props.get("ActiveState")
            if healthy and state == "active" and props.get("SubState") == "running":
                return elapsed
            if state in ("failed", "inactive") and elapsed > 0.2:
                raise SwitchError(
                    f"{model['name']}: the server exited while loading ({props.get('Result')})",
                    detail=journal_tail(unit),
                )
        if elapsed > timeout:
            raise SwitchError(
                f"{model['name']}: not healthy after {timeout:.0f}s", detail=journal_tail(unit)
            )
        if elapsed - last_note >= 5:
            progress(f"loading {model['name']}: {elapsed:.0f}s")
            last_note = elapsed
        time.sleep(0.01)


def verify(catalog: Catalog, model: dict[str, Any]) -> None:
    """/props shows the configured context; a one-token completion answers."""
    base = catalog.address(model)
    key = catalog.api_key()
    status, props = http(base + "/props", key=key)
    if status != 200 or not isinstance(props, dict):
        raise SwitchError(f"{model['name']}: /props answered {status}")
    per_slot = props.get("default_generation_settings", {}).get("n_ctx")
    slots = props.get("total_slots", 1)
    want = model["ctx_size"] // model["parallel"]
    if per_slot != want or slots != model["parallel"]:
        raise SwitchError(
            f"{model['name']}: serves {slots} slots x {per_slot} context, "
            f"the catalog asks {model['parallel']} x {want}"
        )
    status, answer = http(
        base + "/completion", {"prompt": "Hello", "n_predict": 1}, key=key, timeout=120
    )
    if status != 200:
        raise SwitchError(f"{model['name']}: a one-token completion answered {status}: {answer}")


def record(state: dict[str, Any], model: dict[str, Any], seconds: float) -> None:
    loads = state.setdefault("loads", {}).setdefault(model["name"], [])
    loads.append(round(seconds, 3))
    del loads[:-HISTORY]
    state["active"] = model["name"]
    state["since"] = time.time()


def switch(catalog: Catalog, name: str) -> dict[str, Any]:
    target = catalog.resolve(name)
    running = active_models(catalog)
    state = load_json(STATE, {})
    if [m["name"] for m in running] == [target["name"]]:
        with contextlib.suppress(OSError):
            if http(catalog.address(target) + "/health", timeout=2)[0] == 200:
                return {"changed": False, "model": target["name"], "previous": target["name"]}
    phases: dict[str, float] = {}
    mark = time.monotonic()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = round(now - mark, 3)
        mark = now

    preflight(catalog, target)
    previous = next((m for m in running if m["name"] != target["name"]), None)
    baseline = gpu_memory()
    phase("checks")
    began = time.monotonic()
    for model in running:
        progress(f"stopping {model['name']}")
        stop_model(model)
    wait_vram_released(baseline)
    phase("stop")
    timeout = learned_timeout(target, state)
    progress(f"starting {target['name']} (health timeout {timeout:.0f}s)")
    try:
        load_s = start_and_wait(catalog, target, timeout)
        phase("load")
        verify(catalog, target)
        phase("verify")
    except SwitchError as failure:
        progress(f"{failure}; rolling back")
        stop_model(target)
        systemctl("reset-failed", target["unit"])
        if previous is None:
            failure.detail = failure.detail or journal_tail(target["unit"])
            raise
        try:
            start_and_wait(catalog, previous, learned_timeout(previous, state))
        except SwitchError as second:
            raise SwitchError(
                f"{failure}; rollback to {previous['name']} failed too: {second}",
                EXIT_ROLLBACK_FAILED,
                failure.detail,
            ) from None
        state["active"] = previous["name"]
        save_json(STATE, state)
        raise SwitchError(
            f"{failure} — rolled back, {previous['name']} is serving again",
            EXIT_FAILED,
            failure.detail,
        ) from None
    record(state, target, load_s)
    state["last_switch"] = {
        "model": target["name"],
        "previous": previous["name"] if previous else None,
        "seconds": round(time.monotonic() - began, 3),
        "load_seconds": round(load_s, 3),
        "at": time.time(),
    }
    save_json(STATE, state)
    return {
        "changed": True,
        "model": target["name"],
        "previous": previous["name"] if previous else None,
        "port": target["port"],
        "load_seconds": round(load_s, 3),
        "switch_seconds": state["last_switch"]["seconds"],
        "phases": phases,
    }


def stop(catalog: Catalog) -> dict[str, Any]:
    running = active_models(catalog)
    for model in running:
        progress(f"stopping {model['name']}")
        stop_model(model)
    state = load_json(STATE, {})
    state["active"] = None
    save_json(STATE, state)
    return {"changed": bool(running), "stopped": [m["name"] for m in running]}


def status(catalog: Catalog) -> dict[str, Any]:
    state = load_json(STATE, {})
    running = active_models(catalog)
    result: dict[str, Any] = {
        "active": running[0]["name"] if len(running) == 1 else None,
        "running": [m["name"] for m in running],
        "gpu": gpu_memory(),
        "models": [],
    }
    for model in catalog.models:
        props = unit_props(
            model["unit"], "ActiveState", "SubState", "MainPID", "ActiveEnterTimestampMonotonic"
        )
        entry: dict[str, Any] = {
            "name": model["name"],
            "port": model["port"],
            "unit": model["unit"],
            "state": props.get("ActiveState"),
            "loads": state.get("loads", {}).get(model["name"], []),
        }
        if model in running:
            health = None
            with contextlib.suppress(OSError):
                health = http(catalog.address(model) + "/health", timeout=2)[0]
            entered = int(props.get("ActiveEnterTimestampMonotonic", "0") or 0)
            pid = int(props.get("MainPID", "0") or 0)
            entry.update(
                pid=pid,
                health=health,
                uptime_s=round(time.monotonic() - entered / 1e6, 1) if entered else None,
                binary_current=runs_current_build(catalog, pid),
            )
        result["models"].append(entry)
    return result


def runs_current_build(catalog: Catalog, pid: int) -> bool | None:
    """Does process `pid` run the llama-server that `current` points at now?

    False after a new llama.cpp build was activated while the model kept serving (provision
    then restarts it); None when it can't be told.
    """
    server = catalog.settings.get("llama_server")
    if not server or not pid:
        return None
    try:
        running = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return running == os.path.realpath(server)


def locked(func: Any, *args: Any) -> Any:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("a") as handle:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        noted = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SwitchError(
                        f"another switch holds {LOCK} for over {LOCK_TIMEOUT_S:.0f}s", EXIT_LOCK
                    ) from None
                if not noted:
                    progress("waiting for another switch to finish")
                    noted = True
                time.sleep(0.05)
        return func(*args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamavm-switch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("switch", "check"):
        p = sub.add_parser(name)
        p.add_argument("model")
        p.add_argument("--json", action="store_true")
    for name in ("stop", "status"):
        sub.add_parser(name).add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        catalog = Catalog()
        if args.command == "switch":
            result = locked(switch, catalog, args.model)
        elif args.command == "check":
            model = catalog.resolve(args.model)
            preflight(catalog, model)
            result = {"model": model["name"], "ok": True}
        elif args.command == "stop":
            result = locked(stop, catalog)
        else:
            result = status(catalog)
    except SwitchError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc), "journal": exc.detail}))
        print(f"llamavm-switch: {exc}", file=sys.stderr)
        if exc.detail:
            print(exc.detail, file=sys.stderr)
        return exc.code
    result.setdefault("ok", True)
    if args.json:
        print(json.dumps(result))
    else:
        print(human(args.command, result))
    return 0


def human(command: str, result: dict[str, Any]) -> str:
    if command == "switch":
        if not result["changed"]:
            return f"{result['model']} is already serving"
        return (
            f"{result['model']} serving on port {result['port']} "
            f"(loaded in {result['load_seconds']:.2f}s, "
            f"switch took {result['switch_seconds']:.2f}s)"
        )
    if command == "stop":
        return "stopped " + (", ".join(result["stopped"]) or "nothing (no model was running)")
    if command == "check":
        return f"{result['model']}: ready to serve"
    return json.dumps(result, indent=2)


if __name__ == "__main__":
    sys.exit(main())
