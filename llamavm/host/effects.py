"""What a transaction changes on the host beside the model's own unit.

The firewall's map and the front door (which model port the LAN reaches, or the wake listener),
the drain of requests in flight before a stop, the companions that run beside the big model,
the prompt caches saved before a stop and restored after a start, and the model's bytes made
local before anything stops. `Effects` is a part of the transaction's `Host`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

from llamavm.host import checks, fetch, http
from llamavm.host import watch as watch_mod
from llamavm.host.activity import in_flight_of
from llamavm.host.contract import Contract, Firewall, HostError, Model
from llamavm.host.runtime import Runtime
from llamavm.host.systemd import Systemd

#: How long saving or restoring one slot (a prompt cache) may take before it is given up.
SLOT_TIMEOUT_S = 60.0
#: A slot holding fewer tokens is not kept: such a prompt costs next to nothing to process
#: again (the verification's own one-token request leaves about this much).
MIN_SLOT_TOKENS = 32


class Effects:
    """The host effects of the transaction's `Host` (a part of it: these are its fields)."""

    contract: Contract
    systemd: Systemd
    runtime: Runtime
    progress: Callable[[str], None]
    clock: Callable[[], float]
    sleep: Callable[[float], None]
    open_ports: Callable[..., bool]
    firewall_state: Callable[[Firewall], list[int]]
    front_door_hold: Callable[[Firewall], bool]
    front_door_wake: Callable[..., bool]
    server_request: Callable[..., tuple[int, Any]]
    # of Serving (runtime.py), the other part
    running_companions: Callable[[], list[Model]]
    healthy: Callable[[Model], bool]
    stop_units: Callable[[list[Model]], None]

    def fetch(self, model: Model, source: dict[str, Any] | None, keep: set[str]) -> dict[str, Any]:
        """Make `model`'s bytes local (stage or pre-warm) before anything is stopped."""
        return fetch.fetch(self.contract, model, source, keep, self.progress)

    # --- the firewall and the front door -------------------------------------------------------

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
        """Front-door requests wait from now until a model is exposed (in the control service's
        wake listener when the front door keeps connections, else in the front door)."""
        fw = self.active_firewall()
        if fw is not None and fw.front_door_map and self.front_door_hold(fw):
            self.progress("front door: new requests wait for the switch")

    # --- requests in flight ----------------------------------------------------------------------

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

    # --- companions ------------------------------------------------------------------------------

    def start_companions(self, models: list[Model]) -> dict[str, str]:
        """Start `models` (companions) at once and wait for each to answer /health: {name:
        why} for those that did not (told; a companion never fails a switch)."""
        runtime = self.runtime
        failed: dict[str, str] = {}
        waiting = []
        for model in models:
            runtime.reset([model])
            error = runtime.start(model)
            if error:
                failed[model.name] = f"systemctl start failed: {error}"
            else:
                self.progress(f"starting companion {model.name}")
                waiting.append(model)
        began = self.clock()
        while waiting:
            elapsed = self.clock() - began
            states = runtime.states(waiting)
            for model in list(waiting):
                state = states.get(model.unit, "")
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

    def leaving(self, target: Model) -> list[Model]:
        """The running companions that do not fit beside `target` (said, with the numbers)."""
        leaving = []
        for companion in self.running_companions():
            if companion.name in target.companions:
                continue
            why = target.companions_stopped.get(companion.name, "not admitted beside it")
            self.progress(
                f"companion {companion.name} stops: it does not fit beside {target.name} ({why})"
            )
            leaving.append(companion)
        return leaving

    def match_companions(self, target: Model) -> dict[str, Any]:
        """Make the companions match the admission for `target` serving: stop those that do not
        fit beside it, start those that do and are not running (their ports opened)."""
        leaving = self.leaving(target)
        self.stop_units(leaving)
        running = {m.name for m in self.running_companions()}
        missing = [m for m in self.contract.beside(target) if m.name not in running]
        failed = self.start_companions(missing) if missing else {}
        started = [m.name for m in missing if m.name not in failed]
        if started:
            self.expose(target)
            self.progress(f"companion(s) {', '.join(started)} serve beside {target.name}")
        return {
            "changed": bool(leaving or started),
            "beside": [m.name for m in self.contract.beside(target) if m.name not in failed],
            "started": started,
            "stopped": {m.name: target.companions_stopped.get(m.name, "") for m in leaving},
            "failed": failed,
        }

    # --- prompt caches across a switch -----------------------------------------------------------

    def slot_stamp(self, model: Model) -> str:
        """What a saved slot is only good for: this unit (model file, context, cache type, every
        flag; on Compose its container's image, command and environment), this llama-server
        build, these GGUF bytes."""
        digest = hashlib.sha256()
        digest.update(self.runtime.identity(model))
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
