"""The host contract as the host reads it: paths, service identity, and per model its unit,
argv, GGUF path and health URLs — computed once on the controller (llamavm/contract.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamavm.host import EXIT_REFUSED

#: The one path the host code knows without the contract: where the contract is.
CONTRACT_PATH = Path("/etc/llamavm/contract.json")
#: llama-server's paths of each companion task: the /v1 one (what the control service routes)
#: first, then the server's other names for the same endpoint (the front door routes them all).
COMPANION_PATHS = {
    "embeddings": ("/v1/embeddings", "/embeddings", "/embedding"),
    "rerank": ("/v1/rerank", "/v1/reranking", "/rerank", "/reranking"),
}
VERSION = 4


class HostError(Exception):
    """A failure with a message an operator can act on, and the exit code it maps to."""

    def __init__(self, message: str, code: int = 1, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Paths:
    contract: Path
    units_staged: Path
    units_live: Path
    state: Path
    sha_cache: Path
    outcomes: Path
    run_dir: Path
    progress: Path
    lock: Path
    failpoints: Path
    llama_server: Path
    switch: Path
    #: Transactions by operation and result, and the last switch (the metrics' counters).
    counters: Path


@dataclass(frozen=True)
class Model:
    name: str
    aliases: tuple[str, ...]
    unit: str
    port: int
    gguf: Path
    base_url: str
    health_url: str
    ctx_size: int
    parallel: int
    health_timeout_s: int
    size_bytes: int | None
    sha256: str | None
    vram: dict[str, Any]
    #: stage: the server reads a verified local copy (`gguf`) of `source`; share: `source` itself.
    load: str = "share"
    #: The GGUF on the model share (None: the same as `gguf`).
    source_path: Path | None = None
    description: str = ""
    #: Reasoning presets: {"effort": default, "presets": [...]}, or None.
    reasoning: dict[str, Any] | None = None
    #: Seconds without a request before the control service puts it to sleep (0: never).
    idle_unload_s: int = 0
    #: Where its server saves its slots (prompt caches) across switches (None: not saved).
    slot_dir: Path | None = None
    #: A companion runs beside the big model that serves (when the admission says it fits).
    companion: bool = False
    #: chat, embeddings or rerank.
    task: str = "chat"
    #: A big model's: the companions that run beside it, and why the others do not.
    companions: tuple[str, ...] = ()
    companions_stopped: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> Path:
        return self.source_path or self.gguf


@dataclass(frozen=True)
class Firewall:
    """The nftables table whose set `set` holds the active model's port (None: no firewall),
    and with a front door, the map that redirects its internal port to that model's port."""

    unit: str
    table: str
    set: str
    front_door_map: str = ""
    front_door_port: int = 0
    #: Where the map sends the internal port while the model sleeps (the control service).
    wake_port: int = 0
    #: With kept connections to the model: the file that sends the front door's requests
    #: through its second set of them (firewall.py turns it over); "" keeps none.
    front_door_flag: str = ""


@dataclass(frozen=True)
class Metrics:
    """Where the sampler writes its series for node_exporter's textfile collector."""

    textfile: Path
    interval_s: float


@dataclass(frozen=True)
class Control:
    """The control service: its port, whether it routes /v1 requests, its helper's socket."""

    port: int
    bind_address: str
    routing: bool
    helper_socket: Path
    unit: str = "llamavm-control.service"
    #: The listener that wakes a sleeping model (0: none, no front door): on a host on
    #: loopback (the front door's map points there); on Compose the front door's upstream.
    wake_port: int = 0
    wake_bind: str = "127.0.0.1"
    #: How long a request that wakes the model waits for it before a retryable 503.
    wake_wait_s: float = 120.0


@dataclass(frozen=True)
class RuntimeSpec:
    """What runs the model servers: systemd units, or the containers of a Compose project (a
    model's `unit` its container's name) on the engine behind `socket`."""

    kind: str = "systemd"
    socket: str = ""
    #: The label every model container of the project carries (KEY or KEY=VALUE).
    label: str = ""
    grace_s: int = 30


@dataclass(frozen=True)
class Contract:
    paths: Paths
    service_user: str
    service_group: str
    api_key_policy: str
    api_key_file: Path
    api_key_min_length: int
    default_model: str
    lock_timeout_s: float
    boot_unit: str
    models: tuple[Model, ...]
    #: Where staged copies live.
    stage_dir: Path
    #: The units any catalog may name (this one's and those of models since removed).
    unit_globs: tuple[str, ...]
    #: The staged copies' size cap, and how long the share may stay silent.
    stage_cap_bytes: int = 0
    share_stall_s: float = 30.0
    firewall: Firewall | None = None
    metrics: Metrics | None = None
    #: The key file is rewritten in place to rotate it (a Compose project's secret, bind-mounted
    #: by path into its containers), not replaced.
    api_key_in_place: bool = False
    #: With a front door: how long to wait for requests in flight before stopping a model.
    drain_s: float = 0.0
    control: Control | None = None
    #: Small models that run beside the big one (never switched to).
    companions: tuple[Model, ...] = ()
    #: What runs the model servers (None: systemd).
    runtime: RuntimeSpec | None = None

    def companion(self, name: str | None) -> Model | None:
        """The companion called `name` (its name or an alias), or None."""
        return next((m for m in self.companions if name in (m.name, *m.aliases)), None)

    def resolve_any(self, name: str) -> Model:
        """A big model or a companion called `name`; refused (exit 2) otherwise."""
        return self.companion(name) or self.resolve(name)

    def beside(self, model: Model | None) -> list[Model]:
        """The companions that run beside `model` (None: nothing serves — all of them)."""
        if model is None:
            return list(self.companions)
        return [m for m in self.companions if m.name in model.companions]

    def resolve(self, name: str) -> Model:
        """The model called `name` (its name or an alias); refused (exit 2) otherwise."""
        for model in self.models:
            if name == model.name or name in model.aliases:
                return model
        known = ", ".join(m.name for m in self.models)
        raise HostError(f"no model named {name!r} — known models: {known}", EXIT_REFUSED)

    def find(self, name: str | None) -> Model | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def default(self) -> Model:
        return self.resolve(self.default_model)

    @property
    def units(self) -> dict[str, Model]:
        return {m.unit: m for m in self.models}


def parse(data: dict[str, Any]) -> Contract:
    """The contract from its JSON form; KeyError/TypeError/ValueError on a malformed one."""
    if data.get("version") != VERSION:
        raise ValueError(f"contract version {data.get('version')!r}, expected {VERSION}")
    paths = Paths(**{key: Path(value) for key, value in data["paths"].items()})
    models = tuple(_model(m) for m in data["models"])
    companions = tuple(_model(m) for m in data.get("companions", []))
    return Contract(
        paths=paths,
        service_user=data["service"]["user"],
        service_group=data["service"]["group"],
        api_key_policy=data["api_key"]["policy"],
        api_key_file=Path(data["api_key"]["file"]),
        api_key_min_length=int(data["api_key"]["min_length"]),
        api_key_in_place=bool(data["api_key"].get("in_place", False)),
        default_model=data["default_model"],
        lock_timeout_s=float(data["switch"]["lock_timeout_s"]),
        boot_unit=data["boot_unit"],
        models=models,
        stage_dir=Path(data["loading"]["stage_dir"]),
        unit_globs=tuple(data["unit_globs"]),
        stage_cap_bytes=int(data["loading"]["stage_cap_bytes"]),
        share_stall_s=float(data["loading"]["share_stall_s"]),
        firewall=_firewall(data["firewall"]),
        metrics=(
            Metrics(Path(data["metrics"]["textfile"]), float(data["metrics"]["interval_s"]))
            if data["metrics"]["enabled"]
            else None
        ),
        drain_s=float(data["front_door"]["drain_s"]) if data["front_door"]["enabled"] else 0.0,
        control=_control(data["control"]),
        companions=companions,
        runtime=RuntimeSpec(**data["runtime"]) if data.get("runtime") else None,
    )


def _model(m: dict[str, Any]) -> Model:
    return Model(
        name=m["name"],
        aliases=tuple(m["aliases"]),
        unit=m["unit"],
        port=int(m["port"]),
        gguf=Path(m["gguf"]),
        base_url=m["base_url"],
        health_url=m["health_url"],
        ctx_size=int(m["ctx_size"]),
        parallel=int(m["parallel"]),
        health_timeout_s=int(m["health_timeout_s"]),
        size_bytes=m["size_bytes"],
        sha256=m["sha256"],
        vram=dict(m["vram"]),
        load=str(m["load"]),
        source_path=Path(m["source"]),
        description=str(m["description"]),
        reasoning=dict(m["reasoning"]) if m["reasoning"] else None,
        idle_unload_s=int(m.get("idle_unload_s", 0)),
        slot_dir=Path(m["slot_dir"]) if m.get("slot_dir") else None,
        companion=bool(m.get("companion", False)),
        task=str(m.get("task", "chat")),
        companions=tuple(str(n) for n in m.get("companions", [])),
        companions_stopped={str(k): str(v) for k, v in m.get("companions_stopped", {}).items()},
    )


def _control(data: dict[str, Any]) -> Control | None:
    if not data["enabled"]:
        return None
    return Control(
        port=int(data["port"]),
        bind_address=str(data["bind_address"]),
        routing=bool(data["routing"]),
        helper_socket=Path(data["helper_socket"]),
        unit=str(data["unit"]),
        wake_port=int(data.get("wake_port") or 0),
        wake_bind=str(data.get("wake_bind") or "127.0.0.1"),
        wake_wait_s=float(data.get("wake_wait_s", 120.0)),
    )


def _firewall(data: dict[str, Any]) -> Firewall | None:
    if not data["enabled"]:
        return None
    front = data["front_door"]
    return Firewall(
        unit=str(data["unit"]),
        table=str(data["table"]),
        set=str(data["set"]),
        front_door_map=str(front["map"]) if front["enabled"] else "",
        front_door_port=int(front["internal_port"]) if front["enabled"] else 0,
        wake_port=int(front.get("wake_port") or 0) if front["enabled"] else 0,
        front_door_flag=str(front.get("pool_flag") or "") if front["enabled"] else "",
    )


def load(path: Path = CONTRACT_PATH) -> Contract:
    """Read the host contract; refuse (exit 2) with the fix when it is missing or malformed."""
    try:
        return parse(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise HostError(
            f"{path} not found — run 'invoke provision' to install the model services",
            EXIT_REFUSED,
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HostError(
            f"{path} is unreadable or malformed ({type(exc).__name__}: {exc}) — "
            "run 'invoke provision' to rewrite it",
            EXIT_REFUSED,
        ) from None


class LiveContract:
    """The host contract as `invoke provision` last wrote it, for the control service (which
    runs on): re-read when the file changes, so a model added to the catalog is known at once.
    What the service was started with (its address, port, routing and key) stays: the control
    role restarts it when those change. A rewrite that does not parse keeps the last good
    contract (and says so in the journal)."""

    def __init__(self, contract: Contract, path: Path | None = None) -> None:
        self._contract = contract
        self._path = path
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    @property
    def now(self) -> Contract:
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp and self._path is not None:
            self._stamp = stamp
            try:
                self._contract = load(self._path)
            except HostError as exc:
                print(f"llamavm-control: kept the last good contract: {exc}", flush=True)
        return self._contract
