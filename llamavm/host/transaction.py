"""The one transaction behind every change of what a host serves.

switch, stop, apply (install changed units) and boot all run here, under the switch lock, in
a process of their own (a transient systemd unit, see cli.py) that outlives whoever asked.
Once the serving model has been stopped, every failure — a refused start, a crash loop, a
stall, a reset connection in the checks, a signal — ends in a rollback: the previous model
(or the previous unit of the same model) is started again and health-gated. Before anything
is stopped, the intent is recorded (state "pending"), so a transaction that dies outright is
finished by `recover` (the transient unit's ExecStopPost, and the boot unit).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamavm.host import (
    EXIT_FAILED,
    EXIT_REFUSED,
    EXIT_ROLLBACK_FAILED,
    EXIT_UNKNOWN,
    checks,
    firewall,
    gpu,
    http,
    share,
    store,
)
from llamavm.host import watch as watch_mod
from llamavm.host.activity import in_flight_of
from llamavm.host.contract import Contract, Firewall, HostError, Model
from llamavm.host.systemd import Systemd

#: systemd states in which a unit counts as running (it holds, or is about to hold, the GPU).
BUSY = ("active", "activating", "reloading", "deactivating")


class Interrupted(BaseException):
    """A signal asked the transaction to stop; raised where it was, so it rolls back."""


class Deferred(HostError):
    """The host is shutting down: no unit can start now. The intent stays recorded and the
    boot unit finishes the transaction (no outcome is written before that)."""


#: While a server loads, how often systemd is asked anyway (its process is watched in /proc).
SYSTEMD_EVERY_S = 5.0
#: How long saving or restoring one slot (a prompt cache) may take before it is given up.
SLOT_TIMEOUT_S = 60.0
#: A slot holding fewer tokens is not kept: such a prompt costs next to nothing to process
#: again (the verification's own one-token request leaves about this much).
MIN_SLOT_TOKENS = 32


def _noop(_: str) -> None:
    pass


@dataclass
class Host:
    """What a transaction works with; unit tests swap the parts that touch the machine."""

    contract: Contract
    systemd: Systemd = field(default_factory=Systemd)
    progress: Callable[[str], None] = _noop
    failpoint: Callable[[str], None] = _noop
    health: Callable[[str], int | None] = http.status_of
    counters: Callable[[int], tuple[int, ...] | None] = watch_mod.process_counters
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    open_ports: Callable[..., bool] = firewall.set_open
    firewall_state: Callable[[Firewall], list[int]] = firewall.open_ports
    front_door_hold: Callable[[Firewall], bool] = firewall.hold
    front_door_wake: Callable[..., bool] = firewall.wake
    server_request: Callable[..., tuple[int, Any]] = http.request

    # --- what runs --------------------------------------------------------------------------

    def running(self) -> list[Model]:
        """Models whose unit is active, starting or stopping right now (one systemctl call)."""
        states = self.systemd.show([m.unit for m in self.contract.models], ["ActiveState"])
        return [
            m for m in self.contract.models if states.get(m.unit, {}).get("ActiveState") in BUSY
        ]

    def running_companions(self) -> list[Model]:
        """Companions whose unit is active, starting or stopping (one systemctl call)."""
        companions = self.contract.companions
        if not companions:
            return []
        states = self.systemd.show([m.unit for m in companions], ["ActiveState"])
        return [m for m in companions if states.get(m.unit, {}).get("ActiveState") in BUSY]

    def start_companions(self, models: list[Model]) -> dict[str, str]:
        """Start `models` (companions) at once and wait for each to answer /health: {name:
        why} for those that did not (told; a companion never fails a switch)."""
        failed: dict[str, str] = {}
        waiting = []
        for model in models:
            self.systemd.reset_failed([model.unit])
            error = self.systemd.start(model.unit)
            if error:
                failed[model.name] = f"systemctl start failed: {error}"
            else:
                self.progress(f"starting companion {model.name}")
                waiting.append(model)
        began = self.clock()
        while waiting:
            elapsed = self.clock() - began
            states = self.systemd.show([m.unit for m in waiting], ["ActiveState"])
            for model in list(waiting):
                state = states.get(model.unit, {}).get("ActiveState", "")
                if self.healthy(model):
                    waiting.remove(model)
                elif state in ("failed", "inactive") and elapsed > 0.5:
                    failed[model.name] = f"its server exited ({state})"
                    waiting.remove(model)
                elif elapsed > model.health_timeout_s:
                    failed[model.name] = f"not healthy after {model.health_timeout_s}s"
                    waiting.remove(model)
            if waiting:
                self.sleep(watch_mod.poll_interval(elapsed))
        for name, why in failed.items():
            self.progress(f"companion {name} did not start: {why}")
        return failed

    def fetch(self, model: Model, source: dict[str, Any] | None, keep: set[str]) -> dict[str, Any]:
        """Make `model`'s bytes local (stage or pre-warm) before anything is stopped."""
        return share.fetch(self.contract, model, source, keep, self.progress)

    # --- the firewall -----------------------------------------------------------------------

    def active_firewall(self) -> Firewall | None:
        """The firewall to keep current: None without one in the contract, or while its unit
        isn't active (before the expose role installed it — that role then opens the serving
        model's port — or stopped by the operator, who turned filtering off)."""
        fw = self.contract.firewall
        if fw is None or self.systemd.props(fw.unit, "ActiveState").get("ActiveState") != "active":
            return None
        return fw

    def check_firewall(self) -> None:
        """Refuse a switch (nothing stopped) when the firewall it must update isn't loaded."""
        fw = self.active_firewall()
        if fw is not None:
            self.firewall_state(fw)

    def companion_ports(self) -> list[int]:
        """The ports of the companions that run and answer (the firewall opens those too)."""
        return [m.port for m in self.running_companions() if self.healthy(m)]

    def expose(self, model: Model | None) -> bool:
        """Open `model`'s port (and the running companions') to the LAN, point the front door
        at `model`, and close every other model port (None: every model port)."""
        fw = self.active_firewall()
        if fw is None:
            return False
        extra = self.companion_ports() if model else []
        ports = [model.port, *extra] if model else []
        changed = self.open_ports(fw, ports, front=model.port if model else None)
        if changed:
            also = f" (and companion port(s) {', '.join(map(str, extra))})" if extra else ""
            self.progress(
                f"firewall: port {model.port} ({model.name}){also} open, other model ports closed"
                if model
                else "firewall: every model port closed"
            )
        return changed

    def asleep(self) -> bool:
        """Close every model port; the front door now reaches the control service's wake
        listener (with no wake listener, its requests wait as during a switch)."""
        fw = self.active_firewall()
        if fw is None:
            return False
        changed = self.front_door_wake(fw, self.companion_ports())
        if changed:
            self.progress("firewall: every model port closed; the front door wakes the model")
        return changed

    def hold_front_door(self) -> None:
        """Front-door requests wait (in the front door) from now until a model is exposed."""
        fw = self.active_firewall()
        if fw is not None and fw.front_door_map and self.front_door_hold(fw):
            self.progress("front door: new requests wait for the switch")

    def in_flight(self, model: Model, key: str | None) -> int:
        """Requests `model`'s server has now: in its slots, and waiting for one (with more
        requests than slots most of them wait; a stop would cut them). Its /metrics; 0 when it
        can't say."""
        try:
            status, text = http.request(model.base_url + "/metrics", key=key, timeout=2)
        except OSError:
            return 0
        if status != 200 or not isinstance(text, str):
            return 0
        return in_flight_of(text)

    def drain(self, models: list[Model]) -> None:
        """Before a stop: wait, at most the contract's drain_s, for `models`' requests in
        flight to finish (new front-door requests are held meanwhile)."""
        if not models or self.contract.drain_s <= 0:
            return
        key = checks.api_key(self.contract)
        deadline = self.clock() + self.contract.drain_s
        told = False
        while busy := sum(self.in_flight(m, key) for m in models):
            if self.clock() >= deadline:
                limit = self.contract.drain_s
                self.progress(f"{busy} request(s) still in flight after {limit:.0f}s; stopping")
                return
            if not told:
                told = True
                self.progress(
                    f"waiting for {busy} request(s) in flight on "
                    f"{', '.join(m.name for m in models)} (at most {self.contract.drain_s:.0f}s)"
                )
            self.sleep(0.1)

    def healthy(self, model: Model) -> bool:
        return self.health(model.health_url) == 200

    # --- prompt caches across a switch -------------------------------------------------------

    def slot_stamp(self, model: Model) -> str:
        """What a saved slot is only good for: this unit (model file, context, cache type, every
        flag), this llama-server build, these GGUF bytes."""
        digest = hashlib.sha256()
        try:
            digest.update((self.contract.paths.units_live / model.unit).read_bytes())
        except OSError:
            digest.update(b"no unit")
        digest.update(os.path.realpath(self.contract.paths.llama_server).encode())
        try:
            st = model.gguf.stat()
            digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            digest.update(b"no gguf")
        return digest.hexdigest()

    def _slot_action(self, model: Model, slot: int, action: str) -> int | None:
        """Save or restore slot `slot` of `model`'s server: the tokens it held, None on failure
        (told: a prompt cache never stops a switch)."""
        url = f"{model.base_url}/slots/{slot}?action={action}"
        try:
            key = checks.api_key(self.contract)
            status, answer = self.server_request(
                url, {"filename": f"slot-{slot}.bin"}, key=key, timeout=SLOT_TIMEOUT_S
            )
        except (OSError, HostError) as exc:
            self.progress(f"prompt cache: {model.name} slot {slot} not {action}d ({exc})")
            return None
        if status != 200 or not isinstance(answer, dict):
            why = answer.get("error", {}).get("message") if isinstance(answer, dict) else answer
            self.progress(f"prompt cache: {model.name} slot {slot} not {action}d ({status}: {why})")
            return None
        return int(answer.get("n_saved" if action == "save" else "n_restored", 0) or 0)

    def save_slots(self, model: Model) -> dict[str, Any] | None:
        """Before `model` stops: its slots saved to its slot directory, as the record to keep
        ({"stamp", "slots": {id: tokens}, "at"}); None when it has nothing to keep."""
        if model.slot_dir is None:
            return None
        began = self.clock()
        saved = {}
        for slot in range(model.parallel):
            tokens = self._slot_action(model, slot, "save")
            if tokens and tokens >= MIN_SLOT_TOKENS:
                saved[str(slot)] = tokens
        if not saved:
            return None
        self.progress(
            f"prompt cache: saved {sum(saved.values())} tokens of {model.name} "
            f"({len(saved)} slot(s), {self.clock() - began:.2f}s)"
        )
        return {"stamp": self.slot_stamp(model), "slots": saved, "at": time.time()}

    def restore_slots(self, model: Model, record: dict[str, Any] | None) -> int | None:
        """After `model` started and was verified: the slots saved at its last stop restored
        (only into the same unit, build and GGUF); the tokens restored, None when the record
        is of another unit, build or GGUF (to be forgotten)."""
        if model.slot_dir is None or not record:
            return 0
        if record.get("stamp") != self.slot_stamp(model):
            self.progress(
                f"prompt cache: {model.name}'s saved slots are of another build, file or "
                "settings; not restored"
            )
            return None
        began = self.clock()
        restored = 0
        for slot in record.get("slots", {}):
            if not str(slot).isdigit() or int(slot) >= model.parallel:
                continue
            restored += self._slot_action(model, int(slot), "restore") or 0
        if restored:
            self.progress(
                f"prompt cache: restored {restored} tokens of {model.name} "
                f"({self.clock() - began:.2f}s)"
            )
        return restored

    def runs_current_build(self, model: Model) -> bool | None:
        """Does the model's server run the llama-server that `current` points at now?"""
        pid = int(self.systemd.props(model.unit, "MainPID").get("MainPID", "0") or 0)
        if not pid:
            return None
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return None
        return exe == os.path.realpath(self.contract.paths.llama_server)

    # --- stopping and starting --------------------------------------------------------------

    def stop_units(self, models: list[Model]) -> None:
        """Stop `models` and wait until their processes are gone (and GPU memory released)."""
        if not models:
            return
        baseline = gpu.memory()
        props = self.systemd.show([m.unit for m in models], ["MainPID"])
        pids = [int(p.get("MainPID", "0") or 0) for p in props.values()]
        for model in models:
            self.progress(f"stopping {model.name}")
        self.systemd.stop([m.unit for m in models])
        deadline = self.clock() + 30
        while any(pid and Path(f"/proc/{pid}").exists() for pid in pids):
            if self.clock() > deadline:
                break
            self.sleep(0.02)
        gpu.wait_released(baseline, self.progress)

    def start_and_watch(self, model: Model, loads: list[float]) -> float:
        """Start `model`, return the seconds until it was healthy; HostError when it can't be."""
        unit = model.unit
        before = self.systemd.props(unit, "InvocationID", "NRestarts")
        self.systemd.reset_failed([unit])
        error = self.systemd.start(unit)
        if error:
            raise HostError(f"{model.name}: systemctl start failed: {error}")
        watch = watch_mod.LoadWatch(
            expected_s=watch_mod.expected_seconds(loads, float(model.health_timeout_s)),
            ceiling_s=float(model.health_timeout_s),
            initial_invocation=before.get("InvocationID", ""),
            initial_restarts=int(before.get("NRestarts", "0") or 0),
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
            sample = watch_mod.Sample(elapsed, self.healthy(model))
            # The server's process, looked at in /proc (no fork): gone means it exited or
            # systemd restarts it, and systemd is asked at once.
            counters = self.counters(pid) if pid else None
            # systemctl is a fork and an exec (under TCG about 0.1 s of CPU, taken from the very
            # load it watches): asked 4 times a second until the server's PID is known, when
            # the server looks ready, when its process is gone, else every SYSTEMD_EVERY_S.
            if (
                sample.healthy
                or (pid and counters is None)
                or elapsed - last_systemd >= (SYSTEMD_EVERY_S if pid else 0.25)
            ):
                last_systemd = elapsed
                props = self.systemd.props(
                    unit, "ActiveState", "SubState", "InvocationID", "MainPID", "NRestarts"
                )
                sample.active_state = props.get("ActiveState", "")
                sample.sub_state = props.get("SubState", "")
                sample.invocation = props.get("InvocationID", "")
                sample.main_pid = int(props.get("MainPID", "0") or 0)
                sample.n_restarts = int(props.get("NRestarts", "0") or 0)
                if sample.main_pid != pid:
                    pid = sample.main_pid
                    counters = self.counters(pid) if pid else None
            if counters is not None and elapsed - last_counters >= 1.0:
                last_counters = elapsed
                sample.counters = counters
            verdict, why = watch.judge(sample)
            if verdict == "ready":
                return elapsed
            if verdict == "fail":
                raise HostError(f"{model.name}: {why}", detail=self.systemd.journal_tail(unit))
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


@dataclass
class Transaction:
    """One transaction `tx` on `host`. The caller holds the lock."""

    host: Host
    tx: str
    op: str = ""
    rolling_back: bool = False

    @property
    def contract(self) -> Contract:
        return self.host.contract

    def _state(self) -> dict[str, Any]:
        return store.load_state(self.contract.paths.state)

    def _save(self, state: dict[str, Any]) -> None:
        store.write_json(self.contract.paths.state, state)

    # --- the operations -------------------------------------------------------------------

    def switch(self, name: str) -> dict[str, Any]:
        target = self.contract.resolve(name)
        state = self._state()
        running = self.host.running()
        if [m.name for m in running] == [target.name] and self.host.healthy(target):
            if state["desired"] != target.name or state["stopped"]:
                state["desired"], state["stopped"] = target.name, False
                self._save(state)
            companions = self._companions(target)
            exposed = self.host.expose(target)
            changed = exposed or bool(companions.pop("changed"))
            result = {"changed": changed, "model": target.name, "previous": target.name}
            if self.contract.companions:
                result["companions"] = companions
            return result
        self.host.check_firewall()
        source = checks.preflight(self.contract, target, self.host.progress)
        # The new model's bytes are made local while the old model keeps serving.
        self.host.failpoint("before_fetch")
        fetched = self.host.fetch(target, source, {m.name for m in running})
        self.host.failpoint("after_fetch")
        previous = next((m for m in running if m.name != target.name), None)
        return self._serve(target, previous, running, state, fetched=fetched)

    def check(self, name: str) -> dict[str, Any]:
        target = self.contract.resolve(name)
        source = checks.preflight(self.contract, target, self.host.progress)
        running = [m.name for m in self.host.running()]
        return {
            "model": target.name,
            "running": running,
            "changed": False,
            "load": target.load,
            "file": share.location(self.contract, target) if source else "share away",
        }

    def stop(self) -> dict[str, Any]:
        """Stop the serving model and the companions beside it: the GPU is left free."""
        running = self.host.running() + self.host.running_companions()
        self.host.stop_units(running)
        closed = self.host.expose(None)
        state = self._state()
        state["desired"], state["stopped"], state["asleep"] = None, True, None
        self._save(state)
        return {"changed": bool(running) or closed, "stopped": [m.name for m in running]}

    def sleep(self, name: str) -> dict[str, Any]:
        """Stop `name` for idleness (the control service asks): only if it alone serves and
        is processing nothing; it stays the chosen model, and the next request through the
        front door or the routing endpoint wakes it."""
        target = self.contract.resolve(name)
        running = self.host.running()
        if [m.name for m in running] != [target.name]:
            serving = ", ".join(m.name for m in running) or "nothing"
            raise HostError(f"{target.name} is not what serves ({serving}): not put to sleep",
                            EXIT_REFUSED)  # fmt: skip
        key = checks.api_key(self.contract)
        if busy := self.host.in_flight(target, key):
            raise HostError(f"{target.name} has {busy} request(s) in flight: not put to sleep",
                            EXIT_REFUSED)  # fmt: skip
        self.host.hold_front_door()
        self.host.drain(running)
        state = self._state()
        self._keep_slots(running, state)
        self.host.stop_units(running)
        self.host.asleep()
        state["desired"], state["stopped"] = target.name, False
        idle_s = target.idle_unload_s
        state["asleep"] = {"model": target.name, "at": time.time(), "idle_s": idle_s}
        state["last"] = {"tx": self.tx, "op": self.op, "model": None, "at": time.time()}
        self._save(state)
        self.host.progress(
            f"{target.name} is asleep"
            + (f" after {idle_s}s without a request" if idle_s else "")
            + "; the next request through the front door or the routing endpoint wakes it"
        )
        return {"changed": True, "asleep": target.name, "stopped": [target.name]}

    def restart(self) -> dict[str, Any]:
        """Restart the serving model through the transaction (gated; rolled back on failure)."""
        running = self.host.running()
        if len(running) != 1:
            raise HostError("no model serves, so none restarts — switch to one first", EXIT_REFUSED)
        self.host.check_firewall()
        self.host.progress(f"restarting {running[0].name}")
        result = self._restart(running[0], None)
        return {**result, "changed": True, "restarted": running[0].name}

    def sync_firewall(self) -> dict[str, Any]:
        """Open the port of the model that serves (healthy) and close the others."""
        running = self.host.running()
        serving = running[0] if len(running) == 1 and self.host.healthy(running[0]) else None
        if serving is None and not running and self._state()["asleep"]:
            return {"changed": self.host.asleep(), "open": []}
        changed = self.host.expose(serving)
        return {"changed": changed, "open": [serving.port] if serving else []}

    def boot(self) -> dict[str, Any]:
        """At boot: finish a transaction the reboot cut short, then serve the chosen model."""
        self.recover("the host rebooted during it")
        state = self._state()
        if self.host.running():
            return {"changed": False, "model": None, "why": "a model already runs"}
        if state["stopped"]:
            return {"changed": False, "model": None, "why": "stopped by the operator"}
        if state["asleep"]:
            # Asleep it stays: the next request wakes it (no load only to sleep again).
            self.host.asleep()
            return {"changed": False, "model": None, "why": f"{state['asleep']['model']} sleeps"}
        wanted = self.contract.find(state["desired"]) or self.contract.default
        try:
            return self.switch(wanted.name)
        except HostError as exc:
            if exc.code != EXIT_REFUSED or wanted.name == self.contract.default_model:
                raise
            self.host.progress(f"{exc}; serving the default model instead")
            return self.switch(self.contract.default_model)

    def recover(self, why: str) -> dict[str, Any]:
        """Finish the pending transaction of a process that died (killed, or a reboot)."""
        state = self._state()
        pending = state["pending"]
        if not pending:
            return {"changed": False}
        tx = str(pending.get("tx", ""))
        outcomes = self.contract.paths.outcomes
        if store.read_outcome(outcomes, tx):
            state["pending"] = None
            self._save(state)
            return {"changed": False}
        self.host.progress(f"transaction {tx} died ({why}); recovering")
        target = self.contract.find(pending.get("target"))
        previous = self.contract.find(pending.get("previous"))
        running = self.host.running()
        outcome: dict[str, Any]
        try:
            if target and [m.name for m in running] == [target.name] and target != previous:
                self.host.verify(target)
                self.host.expose(target)
                state["desired"], state["stopped"] = target.name, False
                outcome = {"ok": True, "code": 0, "model": target.name, "changed": True}
            else:
                raise HostError(f"transaction {tx} died ({why})")
        except BaseException as failure:
            backup = pending.get("backup")
            undo = (lambda: self._restore_unit(target, backup)) if target and backup else None
            try:
                self._rollback(target, previous, running, state, failure, undo)
            except HostError as exc:
                outcome = {"ok": False, "code": exc.code, "error": str(exc), "journal": exc.detail}
            state = self._state()
        outcome.update(tx=tx, op=pending.get("op", ""), recovered=why, at=time.time())
        store.save_outcome(outcomes, tx, outcome, self.contract.paths.counters)
        state["pending"] = None
        self._save(state)
        return {"changed": True, "recovered": tx, "outcome": outcome}

    def _units(self) -> tuple[dict[str, str], dict[str, str]]:
        """The staged and the installed text of every model unit."""
        paths = self.contract.paths
        staged: dict[str, str] = {}
        for model in (*self.contract.models, *self.contract.companions):
            try:
                staged[model.unit] = (paths.units_staged / model.unit).read_text()
            except OSError:
                raise HostError(
                    f"{paths.units_staged / model.unit} is missing — run 'invoke provision'",
                    EXIT_REFUSED,
                ) from None
        live = {
            p.name: p.read_text()
            for pattern in self.contract.unit_globs
            for p in paths.units_live.glob(pattern)
        }
        return staged, live

    def drift(self) -> list[str]:
        """What `apply` would do now, without doing it (read-only, no lock): the drift probe
        of `invoke provision` asks this before it skips a host's roles."""
        staged, live = self._units()
        found = [
            f"{self.contract.paths.units_live / u}: "
            + ("missing" if u not in live else "differs from the staged unit")
            for u, text in sorted(staged.items())
            if live.get(u) != text
        ]
        found += [
            f"{self.contract.paths.units_live / u}: its model is no longer in the catalog"
            for u in sorted(live)
            if u not in staged
        ]
        running = self.host.running()
        if len(running) > 1:
            found.append("several models run: " + ", ".join(m.name for m in running))
        elif not running:
            found.append("no model serves (provision starts the chosen one)")
        elif self.host.runs_current_build(running[0]) is False:
            found.append(f"{running[0].name} runs an older llama.cpp build")
        if len(running) == 1:
            beside = {m.name for m in self.host.running_companions()}
            found += [
                f"companion {m.name} is not running beside {running[0].name}"
                for m in self.contract.beside(running[0])
                if m.name not in beside
            ]
        every = [m.unit for m in (*self.contract.models, *self.contract.companions)]
        enabled = self.host.systemd.enabled(every)
        found += [f"{unit}: enabled (only the boot unit starts models)" for unit in enabled]
        return found

    def apply(self) -> dict[str, Any]:
        """Install the units provision staged; restart the serving model only when its
        [Service] changed (through this transaction), never for a dependency change."""
        paths = self.contract.paths
        staged, live = self._units()
        running = self.host.running()
        if len(running) > 1:  # started by hand around Conflicts=: keep the chosen one
            desired = self._state()["desired"]
            keep = next((m for m in running if m.name == desired), running[0])
            self.host.progress(f"several models run; keeping {keep.name}")
            self.host.stop_units([m for m in running if m != keep])
            running = [keep]
        serving = running[0] if running else None
        report: dict[str, Any] = {"installed": [], "restarted": [], "removed": [], "started": None}
        changed = [unit for unit, text in staged.items() if live.get(unit) != text]
        restart = [
            u
            for u in changed
            if serving and u == serving.unit and u in live
            and service_section(live[u]) != service_section(staged[u])
        ]  # fmt: skip
        # A running companion whose [Service] changed restarts (plainly: nothing is exclusive).
        companions = {m.unit: m for m in self.contract.companions}
        beside = {m.unit for m in self.host.running_companions()}
        restart_companions = [
            companions[u]
            for u in changed
            if u in companions and u in beside and u in live
            and service_section(live[u]) != service_section(staged[u])
        ]  # fmt: skip
        removed = [unit for unit in live if unit not in staged]
        if removed:  # units of models no longer in the catalog: stop them if they run
            states = self.host.systemd.show(removed, ["ActiveState"])
            busy = [u for u in removed if states.get(u, {}).get("ActiveState") in BUSY]
            for unit in busy:
                self.host.progress(f"stopping {unit}: its model left the catalog")
            self.host.systemd.stop(busy)
        for unit in [u for u in changed if u not in restart]:
            install_unit(paths.units_live / unit, staged[unit])
            report["installed"].append(unit)
        for unit in removed:
            self.host.systemd.disable([unit])
            (paths.units_live / unit).unlink(missing_ok=True)
            report["removed"].append(unit)
        if report["installed"] or report["removed"]:
            self.host.systemd.daemon_reload()
        if serving and not restart and self.host.runs_current_build(serving) is False:
            self.host.progress(f"{serving.name} runs an older llama.cpp build; restarting it")
            self._restart(serving, None)
            report["restarted"].append(serving.unit)
        for unit in restart:
            self.host.progress(f"{self.contract.units[unit].name}: its service changed")
            self._restart(self.contract.units[unit], staged[unit])
            report["restarted"].append(unit)
        if restart_companions:
            for model in restart_companions:
                self.host.progress(f"companion {model.name}: its service changed; restarting")
            self.host.stop_units(restart_companions)
            report["restarted"] += [m.unit for m in restart_companions]
        every = [m.unit for m in (*self.contract.models, *self.contract.companions)]
        enabled = self.host.systemd.enabled(every)
        if enabled:  # the boot unit starts the chosen model; no model unit starts on its own
            self.host.systemd.disable(enabled)
            report["disabled"] = enabled
        if not self.host.running():
            state = self._state()
            wanted = self.contract.find(state["desired"]) or self.contract.default
            result = self.switch(wanted.name)
            report["started"] = result["model"]
        else:
            serving = self.host.running()[0]
            report["companions"] = self._companions(serving)
            report["firewall"] = self.sync_firewall()["changed"]
        report["changed"] = any(report[k] for k in ("installed", "restarted", "removed", "started"))
        report["changed"] = report["changed"] or bool(report.get("companions", {}).get("changed"))
        report["changed"] = report["changed"] or bool(
            report.get("disabled") or report.get("firewall")
        )
        return report

    # --- the transaction core -----------------------------------------------------------------

    def rotate_key(self) -> dict[str, Any]:
        """A new API key: written (0600, root), then the serving model restarted with it
        through this transaction; a failed restart puts the old key back before the rollback
        starts the model again."""
        if self.contract.api_key_policy != "required":
            raise HostError(
                "the catalog's settings.api_key.policy is none: there is no key to rotate — "
                "set it to required and run 'invoke provision'",
                EXIT_REFUSED,
            )
        path = self.contract.api_key_file
        try:
            old = path.read_text()
        except OSError:
            old = None
        store.write_secret(path, secrets.token_urlsafe(36) + "\n")
        checks.api_key(self.contract)  # the new key passes the same checks
        running = self.host.running()
        serving = running[0] if len(running) == 1 else None

        def restore() -> None:
            if old is not None:
                store.write_secret(path, old)

        if serving is not None:
            self.host.progress(f"restarting {serving.name} with the new key")
            self._restart(serving, None, also_undo=restore)
        if self.contract.control is not None:  # it reads the key at start (a credential)
            self.host.systemd.try_restart(self.contract.control.unit)
        return {"changed": True, "restarted": serving.name if serving else None}

    def _restart(
        self,
        model: Model,
        new_text: str | None,
        also_undo: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Restart the serving `model` (with its new unit text, if any) as a transaction."""
        state = self._state()
        unit_path = self.contract.paths.units_live / model.unit
        backup = None
        if new_text is not None:
            backup = self.contract.paths.state.parent / "unit-backup" / model.unit
            store.secure_dir(backup.parent, 0o700)
            backup.write_text(unit_path.read_text())

        def install() -> None:
            if new_text is not None:
                install_unit(unit_path, new_text)
                self.host.systemd.daemon_reload()

        def undo() -> None:
            self._restore_unit(model, str(backup) if backup else None)
            if also_undo:
                also_undo()

        # The new unit may read other bytes (say, a staged copy where it read the share): make
        # them local first, while the model still serves from its old unit.
        source = checks.preflight(self.contract, model, self.host.progress)
        fetched = self.host.fetch(model, source, {model.name})
        return self._serve(
            model, model, [model], state,
            before_start=install, undo=undo, backup=backup, fetched=fetched,
        )  # fmt: skip

    def _restore_unit(self, model: Model | None, backup: str | None) -> None:
        if model is None or not backup:
            return
        try:
            text = Path(backup).read_text()
        except OSError:
            return
        install_unit(self.contract.paths.units_live / model.unit, text)
        self.host.systemd.daemon_reload()

    def _serve(
        self,
        target: Model,
        previous: Model | None,
        running: list[Model],
        state: dict[str, Any],
        *,
        before_start: Callable[[], None] | None = None,
        undo: Callable[[], None] | None = None,
        backup: Path | None = None,
        fetched: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Stop `running`, start `target`, gate and verify it; any failure rolls back."""
        host = self.host
        state["pending"] = {
            "tx": self.tx,
            "op": self.op,
            "target": target.name,
            "previous": previous.name if previous else None,
            "backup": str(backup) if backup else None,
            "started": time.time(),
        }
        state["asleep"] = None  # whatever this ends in, it is not the idle sleep
        self._save(state)
        began = mark = host.clock()
        phases: dict[str, float] = {}
        leaving: list[Model] = []

        def phase(name: str) -> None:
            nonlocal mark
            now = host.clock()
            phases[name] = round(now - mark, 3)
            mark = now

        try:
            if running:
                host.hold_front_door()
                host.drain(running)
                phase("drain")
                if self._keep_slots(running, state):
                    phase("cache_save")
            # Companions that would not fit beside the target stop with the old model.
            leaving = self._leaving(target)
            host.stop_units(running + leaving)
            phase("stop")
            host.failpoint("after_stop")
            if before_start:
                before_start()
            load_s = host.start_and_watch(target, state["loads"].get(target.name, []))
            phase("load")
            host.failpoint("before_verify")
            host.progress(f"verifying {target.name}")
            host.verify(target)
            phase("verify")
            # After the verification's own request, which would take a slot.
            restored = self._restore_slots(target, state)
            if restored:
                phase("cache_restore")
            # Only now may the LAN reach it: a half-loaded or failing model is never exposed.
            host.failpoint("before_expose")
            host.expose(target)
            phase("expose")
        except BaseException as failure:  # every failure after the stop rolls back
            self._rollback(target, previous, running, state, failure, undo)
        # The companions that fit beside it start once it serves (a failure is told only).
        companions = self._companions(target)
        companions.pop("changed")
        companions["stopped"].update(
            {m.name: target.companions_stopped.get(m.name, "") for m in leaving}
        )
        if companions["started"]:
            phase("companions")
        store.record_load(state, target.name, load_s, fetched)
        state["desired"], state["stopped"], state["pending"] = target.name, False, None
        seconds = round(host.clock() - began, 3)
        state["last"] = {"tx": self.tx, "op": self.op, "model": target.name, "at": time.time()}
        self._save(state)
        return {
            "changed": True,
            "model": target.name,
            "previous": previous.name if previous else None,
            "port": target.port,
            "load_seconds": round(load_s, 3),
            "switch_seconds": seconds,
            # No model answered from the stop until the new one was healthy.
            "downtime_seconds": round(phases["stop"] + phases["load"], 3),
            "phases": phases,
            **({"cache_restored_tokens": restored} if restored else {}),
            **({"companions": companions} if self.contract.companions else {}),
            **({"fetch": fetched} if fetched else {}),
        }

    def _rollback(
        self,
        target: Model | None,
        previous: Model | None,
        running: list[Model],
        state: dict[str, Any],
        failure: BaseException,
        undo: Callable[[], None] | None,
    ) -> None:
        """Serve what served before; raise HostError saying how that went (always raises)."""
        self.rolling_back = True
        host = self.host
        reason, detail = describe(failure)
        if host.systemd.system_state() == "stopping":
            host.progress(f"{reason}; the host is shutting down, the boot will finish this")
            raise Deferred(f"{reason}; deferred to the next boot", EXIT_UNKNOWN, detail)
        if target and not detail:
            detail = host.systemd.journal_tail(target.unit)
        host.progress(f"{reason}; rolling back")
        # A different previous model still healthy (the failure came before its stop) stays.
        keep = previous if previous and previous != target and host.healthy(previous) else None
        stopping = [m for m in host.running() if m != keep]
        host.stop_units(stopping)
        units = [m.unit for m in stopping] + ([target.unit] if target else [])
        host.systemd.reset_failed(sorted(set(units)))
        if undo:
            undo()
        fallback, via_default = previous, False
        if fallback is None and target and target.name != self.contract.default_model:
            fallback, via_default = self.contract.default, True
        if fallback is None:
            state["pending"] = None
            self._save(state)
            raise HostError(
                f"{reason} — rolled back; nothing was serving before{self._expose_after(None)}",
                EXIT_FAILED,
                detail,
            )
        try:
            if keep is None:
                host.start_and_watch(fallback, state["loads"].get(fallback.name, []))
                self._restore_slots(fallback, state)
        except BaseException as second:
            state["pending"] = None
            self._save(state)
            raise HostError(
                f"{reason}; rollback to {fallback.name} failed too: {describe(second)[0]}"
                + self._expose_after(None),
                EXIT_ROLLBACK_FAILED,
                detail,
            ) from None
        state["desired"], state["stopped"], state["pending"] = fallback.name, False, None
        state["last"] = {"tx": self.tx, "op": self.op, "model": fallback.name, "at": time.time()}
        self._save(state)
        try:
            self._companions(fallback)
        except (HostError, OSError) as exc:
            host.progress(f"companions beside {fallback.name}: {exc}")
        serves = (
            f"the default model {fallback.name} serves (nothing was serving before)"
            if via_default
            else f"{fallback.name} is serving again"
        )
        serves += self._expose_after(fallback)
        raise HostError(f"{reason} — rolled back, {serves}", EXIT_FAILED, detail)

    def _leaving(self, target: Model) -> list[Model]:
        """The running companions that do not fit beside `target` (said, with the numbers)."""
        leaving = []
        for companion in self.host.running_companions():
            if companion.name in target.companions:
                continue
            why = target.companions_stopped.get(companion.name, "not admitted beside it")
            self.host.progress(
                f"companion {companion.name} stops: it does not fit beside {target.name} ({why})"
            )
            leaving.append(companion)
        return leaving

    def _companions(self, target: Model) -> dict[str, Any]:
        """Make the companions match the admission for `target` serving: stop those that do not
        fit beside it, start those that do and are not running (their ports opened)."""
        leaving = self._leaving(target)
        self.host.stop_units(leaving)
        running = {m.name for m in self.host.running_companions()}
        missing = [m for m in self.contract.beside(target) if m.name not in running]
        failed = self.host.start_companions(missing) if missing else {}
        started = [m.name for m in missing if m.name not in failed]
        if started:
            self.host.expose(target)
            self.host.progress(f"companion(s) {', '.join(started)} serve beside {target.name}")
        return {
            "changed": bool(leaving or started),
            "beside": [m.name for m in self.contract.beside(target) if m.name not in failed],
            "started": started,
            "stopped": {m.name: target.companions_stopped.get(m.name, "") for m in leaving},
            "failed": failed,
        }

    def _restore_slots(self, model: Model, state: dict[str, Any]) -> int:
        """Restore `model`'s kept slots; a record that no longer fits is forgotten."""
        restored = self.host.restore_slots(model, state["slots"].get(model.name))
        if restored is None:
            state["slots"].pop(model.name, None)
        return restored or 0

    def _keep_slots(self, models: list[Model], state: dict[str, Any]) -> bool:
        """Save the slots of `models` before they stop, and record them (state saved)."""
        kept = False
        for model in models:
            record = self.host.save_slots(model)
            if record:
                state["slots"][model.name] = record
                kept = True
        if kept:
            self._save(state)
        return kept

    def _expose_after(self, model: Model | None) -> str:
        """The rollback's firewall update: what serves is what the LAN reaches. Its failure
        is told, not raised: the model serves either way."""
        try:
            self.host.expose(model)
        except HostError as exc:
            return f" (but {exc})"
        return ""


def describe(failure: BaseException) -> tuple[str, str]:
    """(one-line reason, journal detail) of any failure."""
    if isinstance(failure, HostError):
        return str(failure), failure.detail
    if isinstance(failure, Interrupted):
        return f"interrupted by {failure}", ""
    return f"{type(failure).__name__}: {failure}", ""


def service_section(text: str) -> list[str]:
    """The [Service] settings of a unit file (comments, blanks, continuations folded)."""
    section, lines, pending = "", [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if pending:
            line, pending = pending + " " + line, ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line
            continue
        if section == "[Service]":
            lines.append(" ".join(line.split()))
    return lines


def install_unit(path: Path, text: str) -> None:
    """Write a unit file atomically (root:root 0644)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
