"""The one transaction behind every change of what a host serves.

switch, stop, sleep, apply (install changed units) and boot all run here, under the switch lock,
in a process of their own (a transient systemd unit, see runner.py) that outlives whoever asked.
Once the serving model has been stopped, every failure — a refused start, a crash loop, a
stall, a reset connection in the checks, a signal — ends in a rollback: the previous model
(or the previous unit of the same model) is started again and health-gated. Before anything
is stopped, the intent is recorded (state "pending"), so a transaction that dies outright is
finished by `recover` (the transient unit's ExecStopPost, and the boot unit).

What it works with is the `Host`: the runtime under the models (runtime.py) and its effects on
the host (effects.py); the unit files are units.py's.
"""

from __future__ import annotations

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
    fetch,
    firewall,
    http,
    store,
)
from llamavm.host import watch as watch_mod
from llamavm.host.contract import Contract, Firewall, HostError, Model
from llamavm.host.effects import Effects
from llamavm.host.engine import EngineApi
from llamavm.host.runtime import Serving
from llamavm.host.systemd import Systemd
from llamavm.host.units import UnitFiles, install_unit


class Interrupted(BaseException):
    """A signal asked the transaction to stop; raised where it was, so it rolls back."""


class Deferred(HostError):
    """The host is shutting down: no unit can start now. The intent stays recorded and the
    boot unit finishes the transaction (no outcome is written before that)."""


def _noop(_: str) -> None:
    pass


@dataclass
class Host(Serving, Effects):
    """What a transaction works with; unit tests swap the parts that touch the machine. Its
    model operations are `Serving`'s (runtime.py), its effects on the host `Effects`'s."""

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
    engine: Callable[[str], EngineApi] = EngineApi


@dataclass
class Transaction(UnitFiles):
    """One transaction `tx` on `host`. The caller holds the lock. Its `drift` and `apply` are
    `UnitFiles`'s (units.py)."""

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
            companions = self.host.match_companions(target)
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
            "file": fetch.location(self.contract, target) if source else "share away",
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
        # Recorded first, like a switch: a sleep killed from here on is finished (the model
        # stopped: asleep) or undone (it still runs: the front door points at it again) by
        # whoever comes next (`recover`).
        state = self._state()
        state["pending"] = {"tx": self.tx, "op": "sleep", "target": target.name,
                            "previous": target.name, "started": time.time()}  # fmt: skip
        self._save(state)
        try:
            self.host.hold_front_door()
            self.host.drain(running)
            self._keep_slots(running, state)
            self.host.failpoint("before_sleep_stop")
            self.host.stop_units(running)
            self.host.failpoint("after_sleep_stop")
        except BaseException:
            self._end_sleep(target, self._state(), finished=not self.host.running())
            raise
        self._end_sleep(target, state, finished=True)
        idle_s = target.idle_unload_s
        self.host.progress(
            f"{target.name} is asleep"
            + (f" after {idle_s}s without a request" if idle_s else "")
            + "; the next request through the front door or the routing endpoint wakes it"
        )
        return {"changed": True, "asleep": target.name, "stopped": [target.name]}

    def _end_sleep(self, target: Model, state: dict[str, Any], *, finished: bool) -> None:
        """A sleep's end, whole or cut short: asleep (the front door wakes it), or — the model
        still runs — serving as before (the front door points at it again)."""
        if finished:
            self.host.asleep()
            state["desired"], state["stopped"] = target.name, False
            state["asleep"] = {"model": target.name, "at": time.time(),
                               "idle_s": target.idle_unload_s}  # fmt: skip
            state["last"] = {"tx": self.tx, "op": "sleep", "model": None, "at": time.time()}
        else:
            self.host.expose(target)
        state["pending"] = None
        self._save(state)

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
        if pending.get("op") == "sleep" and target is not None:
            # A sleep stops nothing but its model: finish it, or undo it while the model runs.
            still = [m.name for m in running] == [target.name]
            if still or not running:
                self._end_sleep(target, state, finished=not running)
                outcome = {"ok": True, "code": 0, "model": target.name if still else None,
                           "asleep": None if still else target.name, "changed": True}  # fmt: skip
                outcome.update(tx=tx, op="sleep", recovered=why, at=time.time())
                store.save_outcome(outcomes, tx, outcome, self.contract.paths.counters)
                return {"changed": True, "recovered": tx, "outcome": outcome}
            previous = None  # something else runs: the general recovery below sorts it out
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
        write = store.rewrite_secret if self.contract.api_key_in_place else store.write_secret
        try:
            old = path.read_text()
        except OSError:
            old = None
        write(path, secrets.token_urlsafe(36) + "\n")
        checks.api_key(self.contract)  # the new key passes the same checks
        running = self.host.running()
        serving = running[0] if len(running) == 1 else None

        def restore() -> None:
            if old is not None:
                write(path, old)

        if serving is not None:
            self.host.progress(f"restarting {serving.name} with the new key")
            self._restart(serving, None, also_undo=restore)
        runtime = self.contract.runtime
        on_systemd = runtime is None or runtime.kind == "systemd"
        if self.contract.control is not None and on_systemd:  # it reads the key at its start
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
            leaving = self.host.leaving(target)
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
        companions = self.host.match_companions(target)
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
        if host.runtime.shutting_down():
            host.progress(f"{reason}; the host is shutting down, the boot will finish this")
            raise Deferred(f"{reason}; deferred to the next boot", EXIT_UNKNOWN, detail)
        if target and not detail:
            detail = host.runtime.logs(target)
        host.progress(f"{reason}; rolling back")
        # A different previous model still healthy (the failure came before its stop) stays.
        keep = previous if previous and previous != target and host.healthy(previous) else None
        stopping = [m for m in host.running() if m != keep]
        host.stop_units(stopping)
        host.runtime.reset(stopping + ([target] if target else []))
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
            self.host.match_companions(fallback)
        except (HostError, OSError) as exc:
            host.progress(f"companions beside {fallback.name}: {exc}")
        serves = (
            f"the default model {fallback.name} serves (nothing was serving before)"
            if via_default
            else f"{fallback.name} is serving again"
        )
        serves += self._expose_after(fallback)
        raise HostError(f"{reason} — rolled back, {serves}", EXIT_FAILED, detail)

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
