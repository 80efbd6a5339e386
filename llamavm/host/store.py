"""What the host remembers: the switch lock, the state file, transaction outcomes and progress,
the sha256 cache, and test failpoints. Writes are atomic (temp file, fsync, rename) and made
under the lock; reads survive a malformed file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamavm.host import (
    EXIT_FAILED,
    EXIT_LOCK,
    EXIT_REFUSED,
    EXIT_ROLLBACK_FAILED,
    EXIT_RUNNING,
    EXIT_UNKNOWN,
)
from llamavm.host.contract import HostError

#: Transaction outcomes kept on the host.
KEEP_OUTCOMES = 200
#: Load times kept per model (they set the learned health timeout).
KEEP_LOADS = 10


def secure_dir(path: Path, mode: int) -> None:
    """Create `path` (root-owned, `mode`) or check an existing one is a real root-owned dir."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or (os.geteuid() == 0 and info.st_uid != 0):
        raise HostError(f"{path} is not a directory owned by root — remove it and retry")
    if stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)


def write_text(path: Path, text: str, mode: int = 0o644, durable: bool = True) -> None:
    """Replace `path` with `text` atomically (a reader sees the old file or the new one), with
    `mode` from the first byte; `durable`: fsynced, file and directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # whatever the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: Path, data: Any, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically and durably."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True), mode)


def write_secret(path: Path, text: str) -> None:
    """Replace `path` with `text`, root's alone (0600) from the first byte, atomically."""
    write_text(path, text, 0o600)


def rewrite_secret(path: Path, text: str) -> None:
    """Write `text` into the existing file `path` itself, keeping its owner, mode and inode:
    a Compose project's key is bind-mounted by path into every container, which would keep
    the old file if it were replaced (a server reads it when it starts)."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "w") as handle:
        handle.truncate(0)
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def read_json(path: Path) -> Any:
    """The JSON in `path`, None when absent; ValueError when malformed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def locked(path: Path, timeout_s: float, waiting: Any = None) -> Iterator[None]:
    """Hold the switch lock: an flock on a root-only file in a root-only directory.

    Only root can open it, so no local user can take it and block every switch. The lock goes
    with the process: a transaction that dies frees it.
    """
    secure_dir(path.parent, 0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HostError(
                        f"another llamavm transaction held {path} for over {timeout_s:.0f}s "
                        "— see 'llamavm-switch status'",
                        EXIT_LOCK,
                    ) from None
                if waiting and not told:
                    waiting()
                    told = True
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


# --- the state file -----------------------------------------------------------------------------


def empty_state() -> dict[str, Any]:
    return {
        "desired": None,
        "stopped": False,
        "loads": {},
        "history": {},
        "pending": None,
        "last": None,
        #: {"model": NAME, "at": UNIX TIME, "idle_s": S}: put to sleep for idleness; the next
        #: request through the front door or the routing endpoint wakes it.
        "asleep": None,
        #: Per model, its slots saved at its last stop: {"stamp", "slots": {id: tokens}, "at"}.
        "slots": {},
    }


def load_state(path: Path, *, repair: bool = True) -> dict[str, Any]:
    """The state, normalised; a malformed file is set aside (and said so), never a traceback.

    Readers outside the lock (status) pass repair=False: they change nothing on disk.
    """
    try:
        raw = read_json(path)
    except (OSError, ValueError) as exc:
        raw = None
        if repair:
            _set_aside(path, f"unreadable ({exc})")
    state = empty_state()
    if raw is None:
        return state
    if not isinstance(raw, dict):
        if repair:
            _set_aside(path, "not a JSON object")
        return state
    if isinstance(raw.get("desired"), str):
        state["desired"] = raw["desired"]
    state["stopped"] = raw.get("stopped") is True
    loads = raw.get("loads")
    if isinstance(loads, dict):
        for name, values in loads.items():
            if isinstance(name, str) and isinstance(values, list):
                good = [float(v) for v in values if isinstance(v, int | float) and v >= 0]
                state["loads"][name] = good[-KEEP_LOADS:]
    history = raw.get("history")
    if isinstance(history, dict):
        state["history"] = {
            name: {k: v for k, v in kinds.items() if k in ("cold", "warm") and isinstance(v, dict)}
            for name, kinds in history.items()
            if isinstance(name, str) and isinstance(kinds, dict)
        }
    for key in ("pending", "last"):
        if isinstance(raw.get(key), dict):
            state[key] = raw[key]
    slots = raw.get("slots")
    if isinstance(slots, dict):
        state["slots"] = {
            name: record
            for name, record in slots.items()
            if isinstance(name, str) and isinstance(record, dict)
            and isinstance(record.get("slots"), dict)
        }  # fmt: skip
    asleep = raw.get("asleep")
    if isinstance(asleep, dict) and isinstance(asleep.get("model"), str):
        state["asleep"] = asleep
    return state


def _set_aside(path: Path, why: str) -> None:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    with contextlib.suppress(OSError):
        os.replace(path, aside)
    print(f"llamavm-switch: {path} was {why}; moved to {aside}, starting afresh", file=sys.stderr)


def record_load(
    state: dict[str, Any], name: str, seconds: float, fetched: dict[str, Any] | None = None
) -> None:
    """Remember a load: its seconds (the learned health timeout), and as the model's last
    cold or warm load, how its bytes were fetched first."""
    loads = state["loads"].setdefault(name, [])
    loads.append(round(seconds, 3))
    del loads[:-KEEP_LOADS]
    if fetched is not None:
        kind = "cold" if fetched.get("cold") else "warm"
        state["history"].setdefault(name, {})[kind] = {
            "fetch_s": fetched.get("seconds", 0.0),
            "read_bytes": fetched.get("read_bytes", 0),
            "from": fetched.get("from", ""),
            "load_s": round(seconds, 3),
            "at": time.time(),
        }


# --- transaction outcomes and progress ------------------------------------------------------------


def outcome_path(directory: Path, tx: str) -> Path:
    return directory / f"{tx}.json"


#: An outcome's exit code as the `result` label of the transaction counters.
RESULTS = {
    0: "ok",
    EXIT_FAILED: "rolled_back",
    EXIT_REFUSED: "refused",
    EXIT_LOCK: "lock_timeout",
    EXIT_ROLLBACK_FAILED: "rollback_failed",
    EXIT_UNKNOWN: "unknown",
    EXIT_RUNNING: "unknown",
}


def empty_counters() -> dict[str, Any]:
    return {"transactions": {}, "last_switch": None, "last_ok_switch": None}


def read_counters(path: Path) -> dict[str, Any]:
    """The counters (never a traceback: a malformed file reads as empty)."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        data = None
    counters = empty_counters()
    if isinstance(data, dict):
        table = data.get("transactions")
        if isinstance(table, dict):
            counters["transactions"] = {
                op: {r: n for r, n in results.items() if isinstance(n, int) and n >= 0}
                for op, results in table.items()
                if isinstance(op, str) and isinstance(results, dict)
            }
        for key in ("last_switch", "last_ok_switch"):
            if isinstance(data.get(key), dict):
                counters[key] = data[key]
    return counters


def count_outcome(path: Path, outcome: dict[str, Any]) -> None:
    """Count a finished transaction by operation and result; remember the last switch and
    the timings of the last one that served its model."""
    op = str(outcome.get("op") or "unknown")
    result = RESULTS.get(int(outcome.get("code", EXIT_UNKNOWN)), "unknown")
    if result == "ok" and op in ("switch", "boot") and not outcome.get("changed"):
        result = "unchanged"
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the lock-timeout outcome is saved outside the switch lock
        counters = read_counters(path)
        results = counters["transactions"].setdefault(op, {})
        results[result] = results.get(result, 0) + 1
        if op in ("switch", "boot") and result != "unchanged":
            last = {"at": outcome.get("at", time.time()), "result": result}
            counters["last_switch"] = last
            if result == "ok":
                counters["last_ok_switch"] = {
                    **last,
                    "model": outcome.get("model"),
                    **{
                        k: outcome[k]
                        for k in ("switch_seconds", "load_seconds", "downtime_seconds")
                        if isinstance(outcome.get(k), int | float)
                    },
                }
        write_json(path, counters)
    finally:
        os.close(fd)


def save_outcome(
    directory: Path, tx: str, outcome: dict[str, Any], counters: Path | None = None
) -> None:
    """Record transaction `tx`'s outcome (and count it, given the counters file)."""
    secure_dir(directory, 0o755)
    if counters is not None:
        count_outcome(counters, outcome)
    write_json(outcome_path(directory, tx), outcome)
    old = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime)[:-KEEP_OUTCOMES]
    for path in old:
        with contextlib.suppress(OSError):
            path.unlink()


def read_outcome(directory: Path, tx: str) -> dict[str, Any] | None:
    try:
        data = read_json(outcome_path(directory, tx))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Progress:
    """Progress lines of one transaction: to a file its followers read, and to stderr (the
    journal). Best effort: a write that fails is dropped, never an error."""

    def __init__(self, directory: Path | None, tx: str) -> None:
        self.path = directory / f"{tx}.log" if directory else None
        if directory:
            with contextlib.suppress(OSError):
                secure_dir(directory, 0o755)

    def __call__(self, text: str) -> None:
        line = f"llamavm-switch: {text}"
        with contextlib.suppress(OSError, ValueError):
            print(line, file=sys.stderr, flush=True)
        if self.path:
            with contextlib.suppress(OSError), self.path.open("a") as handle:
                handle.write(line + "\n")


def progress_path(directory: Path, tx: str) -> Path:
    return directory / f"{tx}.log"


# --- failpoints (tests only) ------------------------------------------------------------------


class Failpoints:
    """Named points where tests make a transaction pause, raise or die.

    Read from `path` only when it is a regular file owned by root and private to root, so
    nobody else can steer a transaction. Absent in production: every call is then a no-op.
    {"after_stop": {"sleep": 5}, "in_verify": {"raise": "reset"}, "in_load": {"kill": true},
     "after_fetch": {"mark": "/run/llamavm/reached", "sleep": 30}}
    """

    def __init__(self, path: Path) -> None:
        self.points: dict[str, dict[str, Any]] = {}
        try:
            info = os.lstat(path)
        except OSError:
            return
        private = stat.S_IMODE(info.st_mode) & 0o077 == 0
        if stat.S_ISREG(info.st_mode) and info.st_uid == 0 and private:
            with contextlib.suppress(OSError, ValueError):
                data = read_json(path)
                if isinstance(data, dict):
                    self.points = {k: v for k, v in data.items() if isinstance(v, dict)}

    def __call__(self, name: str) -> None:
        point = self.points.pop(name, None)  # each fires once: never again in the rollback
        if not point:
            return
        if point.get("mark"):  # tell a test the transaction got here
            with contextlib.suppress(OSError):
                Path(str(point["mark"])).touch()
        if point.get("sleep"):
            time.sleep(float(point["sleep"]))
        if point.get("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        if point.get("raise"):
            raise ConnectionResetError(f"failpoint {name}: {point['raise']}")
