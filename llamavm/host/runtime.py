"""What runs the model servers: the runtime seam, and the transaction's model operations on it.

`Runtime` is all the transaction asks of whatever runs one model's server — start, stop,
is-active, logs, and a look at its unit while it loads; `SystemdRuntime` is that on systemd
(through systemd.py, the one place that speaks to systemctl). `Serving`, a part of the
transaction's `Host`, builds on it: what runs, stop and wait for the GPU, start and watch the
load (watch.py judges it), verify.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from llamavm.host import checks, gpu, http
from llamavm.host import watch as watch_mod
from llamavm.host.contract import Contract, HostError, Model
from llamavm.host.engine import EngineApi
from llamavm.host.systemd import Systemd

#: systemd states in which a unit counts as running (it holds, or is about to hold, the GPU).
BUSY = ("active", "activating", "reloading", "deactivating")
#: While a server loads, how often systemd is asked anyway (its process is watched in /proc).
SYSTEMD_EVERY_S = 5.0


@dataclass
class UnitState:
    """One look at a model's unit: its state and sub-state, which start of it this is (an
    invocation), its server's PID (0: none) and how often it was restarted."""

    active: str = ""
    sub: str = ""
    invocation: str = ""
    pid: int = 0
    restarts: int = 0
    #: Seconds since it became active (None: not known, or not active).
    uptime_s: float | None = None


class Runtime(Protocol):
    """Start, stop, is-active and logs of one model's unit (the transaction's only way to them)."""

    def states(self, models: Sequence[Model]) -> dict[str, str]:
        """The state of each model's unit (active, activating, failed, ...), by unit: one look."""
        ...

    def look(self, model: Model) -> UnitState:
        """`model`'s unit now (the load watch asks this)."""
        ...

    def pid(self, model: Model) -> int:
        """The PID of `model`'s server; 0 when none runs."""
        ...

    def start(self, model: Model) -> str:
        """Queue `model`'s start (no waiting): '' or why it could not start."""
        ...

    def stop(self, models: Sequence[Model]) -> None:
        """Stop `models`; return once their servers' processes are gone."""
        ...

    def reset(self, models: Sequence[Model]) -> None:
        """Forget that `models` failed (their next start is a fresh one)."""
        ...

    def logs(self, model: Model, lines: int = 25) -> str:
        """The last `lines` lines `model`'s server wrote."""
        ...

    def counters(self, model: Model, pid: int) -> tuple[int, ...] | None:
        """What `model`'s server (PID `pid`) has done so far (CPU, I/O): a load that moves
        them progresses. None when it can't be seen."""
        ...

    def show(self, models: Sequence[Model]) -> dict[str, UnitState]:
        """Each model's unit now, with its uptime (what status reports), by unit."""
        ...

    def identity(self, model: Model) -> bytes:
        """What `model`'s server is made of (its unit file, or its container's image, command
        and environment): a saved prompt cache is only good for the same."""
        ...

    def shutting_down(self) -> bool:
        """Is the machine under the servers shutting down (no start can succeed now)?"""
        ...


class SystemdRuntime:
    """The model servers as systemd units (a model's `unit`); `clock` and `sleep` time the wait
    for a stopped unit's processes to be gone."""

    START = "systemctl start"

    def __init__(
        self,
        systemd: Systemd,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        counters: Callable[[int], tuple[int, ...] | None] = watch_mod.process_counters,
        units_live: Path = Path("/etc/systemd/system"),
    ) -> None:
        self.systemd, self.clock, self.sleep = systemd, clock, sleep
        self._counters = counters
        self.units_live = units_live

    def states(self, models: Sequence[Model]) -> dict[str, str]:
        props = self.systemd.show([m.unit for m in models], ["ActiveState"])
        return {unit: values.get("ActiveState", "") for unit, values in props.items()}

    def look(self, model: Model) -> UnitState:
        props = self.systemd.props(
            model.unit, "ActiveState", "SubState", "InvocationID", "MainPID", "NRestarts"
        )
        return UnitState(
            active=props.get("ActiveState", ""),
            sub=props.get("SubState", ""),
            invocation=props.get("InvocationID", ""),
            pid=int(props.get("MainPID", "0") or 0),
            restarts=int(props.get("NRestarts", "0") or 0),
        )

    def pid(self, model: Model) -> int:
        return int(self.systemd.props(model.unit, "MainPID").get("MainPID", "0") or 0)

    def start(self, model: Model) -> str:
        return self.systemd.start(model.unit)

    def stop(self, models: Sequence[Model]) -> None:
        props = self.systemd.show([m.unit for m in models], ["MainPID"])
        pids = [int(p.get("MainPID", "0") or 0) for p in props.values()]
        self.systemd.stop([m.unit for m in models])
        deadline = self.clock() + 30
        while any(pid and Path(f"/proc/{pid}").exists() for pid in pids):
            if self.clock() > deadline:
                break
            self.sleep(0.02)

    def reset(self, models: Sequence[Model]) -> None:
        self.systemd.reset_failed(sorted({m.unit for m in models}))

    def logs(self, model: Model, lines: int = 25) -> str:
        return self.systemd.journal_tail(model.unit, lines)

    def counters(self, model: Model, pid: int) -> tuple[int, ...] | None:
        """The server's process in /proc (no fork)."""
        return self._counters(pid) if pid else None

    def show(self, models: Sequence[Model]) -> dict[str, UnitState]:
        names = ["ActiveState", "SubState", "MainPID", "ActiveEnterTimestampMonotonic",
                 "NRestarts"]  # fmt: skip
        props = self.systemd.show([m.unit for m in models], names)
        found = {}
        for model in models:
            unit = props.get(model.unit, {})
            entered = int(unit.get("ActiveEnterTimestampMonotonic", "0") or 0)
            found[model.unit] = UnitState(
                active=unit.get("ActiveState", ""),
                sub=unit.get("SubState", ""),
                pid=int(unit.get("MainPID", "0") or 0),
                restarts=int(unit.get("NRestarts", "0") or 0),
                uptime_s=round(time.monotonic() - entered / 1e6, 1) if entered else None,
            )
        return found

    def shutting_down(self) -> bool:
        return self.systemd.system_state() == "stopping"

    def identity(self, model: Model) -> bytes:
        try:
            return (self.units_live / model.unit).read_bytes()
        except OSError:
            return b"no unit"


# --- the Compose side -------------------------------------------------------------------------
#
# The model servers as the containers of one Compose project, through the engine's API
# (engine.py). A model's `unit` is its container's name; the project renders and creates the
# containers, this only starts, stops and looks at them, in systemd's vocabulary:
#
#     running           active / running       (the server may still load: /health says)
#     restarting        activating / auto-restart   (on-failure restart: a crash)
#     created, exited   inactive / dead        (exit 0, or a stop's SIGTERM/SIGKILL)
#     exited (other)    failed / failed
#     removing          deactivating / stop
#     (no container)    inactive / dead
#
# The start of a run (the engine's StartedAt) stands for systemd's InvocationID, the engine's
# RestartCount for NRestarts, the container's CPU and bytes read (its stats) for the server's
# /proc counters — so the load watch, the roll back and the recovery above the seam are the
# same code for both runtimes.

#: Exit codes of a server that was stopped, not one that failed (0, SIGINT, SIGKILL, SIGTERM).
STOPPED_CODES = (0, 130, 137, 143)
#: The engine's "never started" time.
NEVER = "0001-01-01T00:00:00Z"
_EXITED = re.compile(r"^Exited \((-?\d+)\)")


def _states(status: str, exit_code: int, oom: bool = False) -> tuple[str, str]:
    if status == "running":
        return "active", "running"
    if status == "paused":
        return "active", "paused"
    if status == "restarting":
        return "activating", "auto-restart"
    if status == "removing":
        return "deactivating", "stop"
    if status in ("exited", "dead") and (oom or exit_code not in STOPPED_CODES):
        return "failed", "failed"
    return "inactive", "dead"


class ComposeRuntime:
    """The model containers of one project on the engine `api`; `grace_s`: how long a stopped
    server gets before SIGKILL (the project's stop_grace_period); `stopping`: the file that
    says the switchd container is being stopped."""

    START = "the engine's start"

    def __init__(self, api: EngineApi, label: str, grace_s: int = 30,
                 stopping: Path | None = None, background: bool = False) -> None:  # fmt: skip
        self.api, self.label, self.grace_s, self.stopping = api, label, grace_s, stopping
        self.background = background
        self._usage: dict[tuple[str, int], _Usage] = {}

    def states(self, models: Sequence[Model]) -> dict[str, str]:
        found: dict[str, str] = {}
        for entry in self.api.containers(self.label):
            code = _EXITED.match(str(entry.get("Status", "")))
            state = _states(str(entry.get("State", "")), int(code.group(1)) if code else 0)[0]
            for name in entry.get("Names") or []:
                found[str(name).lstrip("/")] = state
        return {m.unit: found.get(m.unit, "inactive") for m in models}

    def look(self, model: Model) -> UnitState:
        data = self.api.inspect(model.unit)
        if not data:
            return UnitState(active="inactive", sub="dead")
        state: dict[str, Any] = data.get("State") or {}
        active, sub = _states(
            str(state.get("Status", "")), int(state.get("ExitCode") or 0),
            bool(state.get("OOMKilled")),
        )  # fmt: skip
        started = str(state.get("StartedAt") or "")
        return UnitState(
            active=active,
            sub=sub,
            invocation="" if started in ("", NEVER) else started,
            pid=int(state.get("Pid") or 0),
            restarts=int(data.get("RestartCount") or 0),
        )

    def pid(self, model: Model) -> int:
        return self.look(model).pid

    def start(self, model: Model) -> str:
        if self.api.inspect(model.unit) is None:
            return f"no container {model.unit} (create the project's containers: invoke provision)"
        return self.api.start(model.unit)

    def stop(self, models: Sequence[Model]) -> None:
        for model in models:
            self.api.stop(model.unit, self.grace_s)

    def reset(self, models: Sequence[Model]) -> None:
        """Nothing to forget: the engine keeps no failed state that blocks a start."""

    def logs(self, model: Model, lines: int = 25) -> str:
        return self.api.logs(model.unit, lines)

    def counters(self, model: Model, pid: int) -> tuple[int, ...] | None:
        """The container's stats. With `background`, the latest of those read in a thread: one
        look makes the engine wait for its next sample (up to a second), which the load watch
        must not wait for; None until the first arrives."""
        if not pid:
            return None
        if not self.background:
            return self.api.usage(model.unit)
        reader = self._usage.get((model.unit, pid))
        if reader is None:
            reader = self._usage[(model.unit, pid)] = _Usage(self.api, model.unit)
        return reader.latest()

    def show(self, models: Sequence[Model]) -> dict[str, UnitState]:
        found = {}
        for model in models:
            unit = self.look(model)
            if unit.active == "active" and unit.invocation:
                unit.uptime_s = _since(unit.invocation)
            found[model.unit] = unit
        return found

    def identity(self, model: Model) -> bytes:
        data = self.api.inspect(model.unit) or {}
        config = data.get("Config") or {}
        made = {k: config.get(k) for k in ("Image", "Cmd", "Entrypoint", "Env", "User")}
        return json.dumps({**made, "image_id": data.get("Image")}, sort_keys=True).encode()

    def shutting_down(self) -> bool:
        """llamavm-switchd's container is being stopped (it left `stopping` when its SIGTERM
        came): the next switchd finishes the transaction, as a systemd host's boot does."""
        return self.stopping is not None and self.stopping.exists()


class _Usage:
    """A container's stats, asked again and again in a thread of its own while someone reads
    them (it ends once nobody asked for USAGE_IDLE_S, or the container stopped)."""

    def __init__(self, api: EngineApi, name: str) -> None:
        self.api, self.name = api, name
        self.value: tuple[int, ...] | None = None
        self.asked = time.monotonic()
        threading.Thread(target=self._read, name=f"usage-{name}", daemon=True).start()

    def latest(self) -> tuple[int, ...] | None:
        self.asked = time.monotonic()
        return self.value

    def _read(self) -> None:
        while time.monotonic() - self.asked < USAGE_IDLE_S:
            try:
                value = self.api.usage(self.name)
            except OSError:
                value = None
            if value is None:
                return
            self.value = value
            time.sleep(0.5)


#: How long a container's stats are read after the last time they were asked for.
USAGE_IDLE_S = 10.0


def stopping_marker(contract: Contract) -> Path:
    """What llamavm-switchd leaves when its container is told to stop (tmpfs: gone at its
    next start)."""
    return contract.paths.run_dir / "switchd-stopping"


def _since(started_at: str) -> float | None:
    """Seconds since the engine's StartedAt (RFC 3339, nanoseconds, UTC)."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z$", started_at)
    if not match:
        return None
    began = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    fraction = float(match.group(2) or 0)
    return round(max(0.0, time.time() - began.timestamp() - fraction), 1)


class Serving:
    """The model operations of the transaction's `Host` (a part of it: these are its fields)."""

    contract: Contract
    systemd: Systemd
    progress: Callable[[str], None]
    failpoint: Callable[[str], None]
    health: Callable[[str], int | None]
    counters: Callable[[int], tuple[int, ...] | None]
    clock: Callable[[], float]
    sleep: Callable[[float], None]

    engine: Callable[[str], EngineApi]

    @property
    def runtime(self) -> Runtime:
        """What runs the model servers, as the contract says: systemd units, or the containers
        of a Compose project on the engine at its socket."""
        spec = self.contract.runtime
        if spec is not None and spec.kind == "compose":
            api = self.engine(spec.socket)
            return ComposeRuntime(api, spec.label, spec.grace_s, stopping_marker(self.contract),
                                  background=isinstance(api, EngineApi))  # fmt: skip
        return SystemdRuntime(self.systemd, self.clock, self.sleep, self.counters,
                              self.contract.paths.units_live)  # fmt: skip

    def running(self) -> list[Model]:
        """Models whose unit is active, starting or stopping right now (one look)."""
        states = self.runtime.states(self.contract.models)
        return [m for m in self.contract.models if states.get(m.unit) in BUSY]

    def running_companions(self) -> list[Model]:
        """Companions whose unit is active, starting or stopping (one look)."""
        companions = self.contract.companions
        if not companions:
            return []
        states = self.runtime.states(companions)
        return [m for m in companions if states.get(m.unit) in BUSY]

    def healthy(self, model: Model) -> bool:
        spec = self.contract.runtime
        if (
            spec is not None
            and spec.kind == "compose"
            and self.runtime.look(model).active != ("active")
        ):
            # A container that does not run has no name on the project's network: asking its
            # /health would wait for the engine's DNS to give up (seconds) to learn the same.
            return False
        return self.health(model.health_url) == 200

    def runs_current_build(self, model: Model) -> bool | None:
        """Does the model's server run the llama-server that `current` points at now?"""
        pid = self.runtime.pid(model)
        if not pid:
            return None
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return None
        return exe == os.path.realpath(self.contract.paths.llama_server)

    def stop_units(self, models: list[Model]) -> None:
        """Stop `models` and wait until their processes are gone (and GPU memory released)."""
        if not models:
            return
        baseline = gpu.memory()
        for model in models:
            self.progress(f"stopping {model.name}")
        self.runtime.stop(models)
        gpu.wait_released(baseline, self.progress)

    def start_and_watch(self, model: Model, loads: list[float]) -> float:
        """Start `model`, return the seconds until it was healthy; HostError when it can't be."""
        runtime = self.runtime
        before = runtime.look(model)
        runtime.reset([model])
        error = runtime.start(model)
        if error:
            raise HostError(f"{model.name}: {runtime.START} failed: {error}")
        watch = watch_mod.LoadWatch(
            expected_s=watch_mod.expected_seconds(loads, float(model.health_timeout_s)),
            ceiling_s=float(model.health_timeout_s),
            initial_invocation=before.invocation,
            initial_restarts=before.restarts,
        )
        self.progress(
            f"starting {model.name} (expected within {watch.expected_s:.0f}s, "
            f"at most {watch.ceiling_s:.0f}s)"
        )
        began = self.clock()
        self.failpoint("in_load")
        last_systemd = last_counters = last_note = -1.0
        pid = 0  # the server's PID, once systemd told it
        while True:
            elapsed = self.clock() - began
            sample = watch_mod.Sample(elapsed, self.health(model.health_url) == 200)
            # The server's process, looked at in /proc (no fork): gone means it exited or
            # systemd restarts it, and systemd is asked at once.
            counters = runtime.counters(model, pid)
            # systemctl is a fork and an exec (under TCG about 0.1 s of CPU, taken from the very
            # load it watches): asked 4 times a second until the server's PID is known, when
            # the server looks ready, when its process is gone, else every SYSTEMD_EVERY_S.
            if (
                sample.healthy
                or (pid and counters is None)
                or elapsed - last_systemd >= (SYSTEMD_EVERY_S if pid else 0.25)
            ):
                last_systemd = elapsed
                unit = runtime.look(model)
                sample.active_state, sample.sub_state = unit.active, unit.sub
                sample.invocation, sample.main_pid = unit.invocation, unit.pid
                sample.n_restarts = unit.restarts
                if sample.main_pid != pid:
                    pid = sample.main_pid
                    counters = runtime.counters(model, pid)
            if counters is not None and elapsed - last_counters >= 1.0:
                last_counters = elapsed
                sample.counters = counters
            verdict, why = watch.judge(sample)
            if verdict == "ready":
                return elapsed
            if verdict == "fail":
                raise HostError(f"{model.name}: {why}", detail=runtime.logs(model))
            if elapsed - last_note >= 5:
                last_note = elapsed
                if elapsed >= 5:
                    self.progress(f"loading {model.name}: {elapsed:.0f}s")
            self.sleep(watch_mod.poll_interval(elapsed))

    def verify(self, model: Model) -> None:
        """/props shows the configured slots and context; a one-token completion answers;
        with an API key policy, a request without the key is refused."""
        key = checks.api_key(self.contract)
        self.failpoint("in_verify")
        status, props = http.request(model.base_url + "/props", key=key)
        if status != 200 or not isinstance(props, dict):
            raise HostError(f"{model.name}: /props answered {status}")
        settings = props.get("default_generation_settings")
        per_slot = settings.get("n_ctx") if isinstance(settings, dict) else None
        slots = props.get("total_slots", 1)
        want = model.ctx_size // model.parallel
        if per_slot != want or slots != model.parallel:
            raise HostError(
                f"{model.name}: serves {slots} slots x {per_slot} context, the catalog asks "
                f"{model.parallel} x {want}"
            )
        status, answer = http.request(
            model.base_url + "/completion",
            {"prompt": "Hello", "n_predict": 1},
            key=key,
            timeout=120,
        )
        if status != 200:
            raise HostError(f"{model.name}: a one-token completion answered {status}: {answer}")
        if key and http.request(model.base_url + "/v1/models")[0] != 401:
            raise HostError(f"{model.name}: the API answers without the key the catalog requires")
