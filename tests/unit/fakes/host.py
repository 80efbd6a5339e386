"""Fakes at the seams of the host package: a contract on temp paths, and a systemd whose units
load, crash, stall or progress on a fake clock — and the switch transaction's Host on them
(fake_systemd, host_on, warm_checks, switch_tx). No host, no root, no real process."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llamavm.host import checks, store
from llamavm.host import contract as contract_mod
from llamavm.host.transaction import Host, Transaction

_PIDS = itertools.count(4_000_001)  # beyond pid_max: never a real /proc entry


def contract_for(tmp_path: Path, gguf: Path, **overrides: Any) -> contract_mod.Contract:
    """A one-model contract ('t', alias 'tee') whose files live under tmp_path."""
    return contracts(tmp_path, {"t": gguf}, **overrides)


def contracts(tmp_path: Path, models: dict[str, Path], **overrides: Any) -> contract_mod.Contract:
    """A contract with `models` (name -> GGUF); model fields may be overridden for all."""
    state = tmp_path / "state"
    run = tmp_path / "run"
    for directory in (state, run, tmp_path / "staged", tmp_path / "live"):
        directory.mkdir(parents=True, exist_ok=True)
    paths = contract_mod.Paths(
        contract=tmp_path / "contract.json",
        units_staged=tmp_path / "staged",
        units_live=tmp_path / "live",
        state=state / "state.json",
        sha_cache=state / "sha256.json",
        outcomes=state / "tx",
        run_dir=run,
        progress=run / "tx",
        lock=run / "lock" / "switch.lock",
        failpoints=run / "failpoints.json",
        llama_server=tmp_path / "llama-server",
        switch=tmp_path / "llamavm-switch",
        counters=state / "counters.json",
    )
    top = {
        k: overrides.pop(k)
        for k in (
            "api_key_policy",
            "service_user",
            "default_model",
            "stage_dir",
            "stage_cap_bytes",
            "share_stall_s",
            "firewall",
            "metrics",
        )
        if k in overrides
    }
    entries = []
    for i, (name, gguf) in enumerate(models.items()):
        port = 8001 + i
        fields: dict[str, Any] = {
            "name": name,
            "aliases": ("tee",) if name == "t" else (),
            "unit": f"llamavm-model-{name}.service",
            "port": port,
            "gguf": gguf,
            "base_url": f"http://127.0.0.1:{port}",
            "health_url": f"http://127.0.0.1:{port}/health",
            "ctx_size": 1024,
            "parallel": 1,
            "health_timeout_s": 60,
            "size_bytes": None,
            "sha256": None,
            "vram": {},
        }
        fields.update(overrides)
        entries.append(contract_mod.Model(**fields))
    import os
    import pwd

    return contract_mod.Contract(
        paths=paths,
        service_user=top.get("service_user", pwd.getpwuid(os.getuid()).pw_name),
        service_group="nogroup",
        api_key_policy=top.get("api_key_policy", "none"),
        api_key_file=tmp_path / "api-key",
        api_key_min_length=32,
        default_model=top.get("default_model", next(iter(models))),
        lock_timeout_s=5,
        boot_unit="llamavm-boot.service",
        models=tuple(entries),
        stage_dir=top.get("stage_dir", tmp_path / "stage"),
        unit_globs=("llamavm-model-*.service", "llamavm-companion-*.service"),
        stage_cap_bytes=top.get("stage_cap_bytes", 1 << 40),
        share_stall_s=top.get("share_stall_s", 10.0),
        firewall=top.get("firewall"),
        metrics=top.get("metrics"),
    )


@dataclass
class Unit:
    behaviour: str = "ok"  # ok | crash | stall | slow | exits
    load_s: float = 0.2
    active: str = "inactive"
    sub: str = "dead"
    pid: int = 0
    invocation: str = ""
    restarts: int = 0
    started_at: float = 0.0
    ticks: int = 0
    text: str = ""


@dataclass
class FakeSystemd:
    """systemd for the transaction's eyes only: units change state as the fake clock moves."""

    now: float = 1000.0
    units: dict[str, Unit] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    enabled_units: set[str] = field(default_factory=set)
    reloads: int = 0
    ports: dict[str, str] = field(default_factory=dict)  # health URL -> unit

    # the clock
    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.001)

    # set-up
    def add(self, contract: contract_mod.Contract, name: str, **unit: Any) -> Unit:
        model = contract.find(name) or contract.companion(name)
        assert model is not None
        self.units[model.unit] = Unit(**unit)
        self.ports[model.health_url] = model.unit
        return self.units[model.unit]

    def serve(self, contract: contract_mod.Contract, name: str) -> None:
        """Put `name` in the running state directly (as after boot)."""
        model = contract.find(name) or contract.companion(name)
        assert model is not None
        unit = self.units[model.unit]
        unit.active, unit.sub, unit.pid, unit.invocation = "active", "running", next(_PIDS), "x0"

    # the seam
    def _tick(self, name: str) -> Unit:
        u = self.units.setdefault(name, Unit())
        if u.active != "activating":
            return u
        elapsed = self.now - u.started_at
        u.ticks += 1
        if u.behaviour in ("ok", "slow") and elapsed >= u.load_s:
            u.active, u.sub = "active", "running"
        elif u.behaviour == "crash" and elapsed >= 0.1:
            if u.sub != "auto-restart":
                u.sub, u.pid = "auto-restart", 0
            elif elapsed >= 1.1:  # RestartSec=1: systemd starts it again
                u.restarts += 1
                u.sub, u.pid, u.started_at = "start", next(_PIDS), self.now
        elif u.behaviour == "exits" and elapsed >= 0.1:
            u.active, u.sub, u.pid = "failed", "failed", 0
        return u

    def show(self, units: Any, props: Any) -> dict[str, dict[str, str]]:
        out = {}
        for name in units:
            known = name in self.units
            u = self._tick(name)
            out[name] = {
                "Id": name,
                "LoadState": "loaded" if known else "not-found",
                "ActiveState": u.active,
                "SubState": u.sub,
                "MainPID": str(u.pid),
                "InvocationID": u.invocation,
                "NRestarts": str(u.restarts),
                "UnitFileState": "enabled" if name in self.enabled_units else "disabled",
            }
        return out

    def props(self, unit: str, *names: str) -> dict[str, str]:
        return self.show([unit], names)[unit]

    def start(self, unit: str) -> str:
        self.calls.append(("start", unit))
        models = {u for u in self.ports.values() if "-companion-" not in u}
        exclusive = "-companion-" not in unit
        for other, state in self.units.items():  # Conflicts= (between the big models' units)
            if exclusive and other != unit and other in models and state.active != "inactive":
                state.active, state.sub, state.pid = "inactive", "dead", 0
        u = self.units.setdefault(unit, Unit())
        u.active, u.sub, u.pid = "activating", "start", next(_PIDS)
        u.invocation, u.started_at, u.ticks = f"inv{next(_PIDS)}", self.now, 0
        return ""

    def stop(self, units: Any) -> None:
        self.calls.append(("stop", *units))
        for unit in units:
            u = self.units.setdefault(unit, Unit())
            u.active, u.sub, u.pid = "inactive", "dead", 0

    def try_restart(self, unit: str) -> None:
        self.calls.append(("try-restart", unit))

    def reset_failed(self, units: Any) -> None:
        self.calls.append(("reset-failed", *units))
        for unit in units:
            u = self.units.get(unit)
            if u and u.active == "failed":
                u.active, u.sub = "inactive", "dead"

    def daemon_reload(self) -> None:
        self.reloads += 1

    def disable(self, units: Any) -> None:
        self.calls.append(("disable", *units))
        self.enabled_units -= set(units)

    def enabled(self, units: Any) -> list[str]:
        return [u for u in units if u in self.enabled_units]

    def journal_tail(self, unit: str, lines: int = 25) -> str:
        return f"journal of {unit}"

    state: str = "running"

    def system_state(self) -> str:
        return self.state

    def run_transient(self, unit: str, argv: Any, properties: Any) -> str:
        self.calls.append(("run", unit))
        return ""

    # what the transaction reads besides systemd
    def health(self, url: str) -> int | None:
        unit = self.ports.get(url)
        if unit is None:
            return None
        u = self._tick(unit)
        if u.active == "active" and u.sub == "running":
            return 200
        if u.active == "activating" and u.behaviour in ("ok", "slow", "stall") and u.pid:
            return 503
        return None

    def counters(self, pid: int) -> tuple[int, ...] | None:
        for u in self.units.values():
            if u.pid == pid:
                moving = u.behaviour in ("slow", "ok")
                return (u.ticks if moving else 0, 1, 2, 3)
        return None

    def running_units(self) -> list[str]:
        """The model units that run (or start), companions' included."""
        models = set(self.ports.values())
        return [
            n for n, u in self.units.items() if n in models and u.active in ("active", "activating")
        ]


def with_fields(model: contract_mod.Model, **changes: Any) -> contract_mod.Model:
    return replace(model, **changes)


#: What checks.preflight finds for a model file that passes: unchanged, readable, in the page
#: cache.
WARM = {"size": 0, "ino": 1, "mtime_ns": 0, "readable": True, "header": "", "resident": 1.0}


def warm_checks(monkeypatch: Any) -> None:
    """The checks before the stop pass for every model (a test that wants them to fail sets
    its own checks.preflight)."""
    monkeypatch.setattr(checks, "preflight", lambda *a, **k: dict(WARM))


def fake_systemd(
    contract: contract_mod.Contract, serving: Any = (), active: Any = ()
) -> FakeSystemd:
    """A FakeSystemd with a unit for every model of `contract` and then every companion, the
    models named in `serving` running and the units named in `active` (say, the firewall's)
    active."""
    fake = FakeSystemd()
    for model in (*contract.models, *contract.companions):
        fake.add(contract, model.name)
    for name in serving:
        fake.serve(contract, name)
    for unit in active:
        fake.units[unit] = Unit(active="active")
    return fake


def host_on(
    contract: contract_mod.Contract, fake: FakeSystemd, progress: Any, **seams: Any
) -> Host:
    """The transaction's Host on `fake`: its units, clock, health answers and /proc counters,
    progress lines to `progress`, any other seams (the firewall's, the server's) as given. The
    check of the new model's answers passes (a test that wants it to fail sets host.verify)."""
    host = Host(
        contract,
        systemd=fake,
        progress=progress,
        health=fake.health,
        counters=fake.counters,
        clock=fake.clock,
        sleep=fake.sleep,
        **seams,
    )
    host.verify = lambda model: None  # type: ignore[method-assign]
    return host


def switch_tx(host: Host) -> Transaction:
    """A switch transaction on `host` (its id abc123)."""
    return Transaction(host, "abc123", "switch")


@contextlib.contextmanager
def lock_held(path: Path) -> Iterator[None]:
    """The switch lock at `path` held by another thread (a live transaction) while the block
    runs."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.locked(path, 5):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5), "the lock was not taken"
    try:
        yield
    finally:
        release.set()
        holder.join()
