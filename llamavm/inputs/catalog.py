"""The model catalog: load config/models.yaml, validate every rule, hand out typed models.

Validation happens in layers, each before the next is trusted: a bounded YAML loader (no alias
bombs, no deep nesting, no endless numbers), a walk that refuses control characters in every
string (they would inject directives into systemd units), the JSON Schema in
config/models.schema.json (types, ranges, patterns, defaults — editors use it too), then the
rules a schema can't say (the share, unique names and ports, the flag allow-list).

Every problem is reported as one line naming the file, the model and the key, what is wrong
and what to do, raised as CatalogError (exit code 2 at the CLI edge).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from llamavm import REPO_ROOT, paths
from llamavm.errors import LlamavmError
from llamavm.inputs import flags, validation, yamlsafe
from llamavm.inputs.validation import describe, short, with_defaults

#: Environment variable that overrides the catalog path (the --catalog flag wins over it).
CATALOG_ENV = "LLAMAVM_CATALOG"
DEFAULT_CATALOG = REPO_ROOT / "config" / "models.yaml"
SCHEMA_PATH = REPO_ROOT / "config" / "models.schema.json"
UNIT_PREFIX = "llamavm-model-"
#: Companions' units: never in the big models' Conflicts= chain.
COMPANION_PREFIX = "llamavm-companion-"


class CatalogError(LlamavmError):
    """The catalog is invalid; the message names file, model, key and the fix."""

    exit_code = 2


@dataclass(frozen=True)
class VramSettings:
    budget_mib: int
    reserve_mib: int
    compute_mib: int


@dataclass(frozen=True)
class ApiKeySettings:
    policy: str
    file: str


@dataclass(frozen=True)
class LoadingSettings:
    default: str
    stage_cap_gib: int
    share_stall_s: int


@dataclass(frozen=True)
class FrontDoorSettings:
    enabled: bool
    wait_s: int
    drain_s: int
    tls: bool


@dataclass(frozen=True)
class ControlSettings:
    enabled: bool
    port: int
    routing: bool


@dataclass(frozen=True)
class ExposeSettings:
    firewall: bool
    allow_from: tuple[str, ...]
    metrics: bool
    metrics_interval_s: int
    front_door: FrontDoorSettings


@dataclass(frozen=True)
class Settings:
    share_path: str
    controller_share_path: str | None
    bind_address: str
    default_model: str
    reserved_ports: dict[str, int]
    vram: VramSettings
    api_key: ApiKeySettings
    loading: LoadingSettings
    expose: ExposeSettings
    control: ControlSettings


@dataclass(frozen=True)
class Reasoning:
    """A model's reasoning presets: the default effort, the ones a request may pick, the format."""

    effort: str
    presets: tuple[str, ...]
    format: str


@dataclass(frozen=True)
class Model:
    name: str
    gguf: str
    port: int
    ctx_size: int
    n_gpu_layers: int
    n_cpu_moe: int
    parallel: int
    cache_type: str
    health_timeout_s: int
    aliases: tuple[str, ...] = ()
    description: str = ""
    extra_args: tuple[str, ...] = ()
    size_bytes: int | None = None
    sha256: str | None = None
    vram_mib: int | None = None
    load: str | None = None
    reasoning: Reasoning | None = None
    #: Seconds without a request before the control service puts the model to sleep (0: never).
    idle_unload_s: int = 0
    #: Save the slots (prompt caches) before a stop, restore them at the next start.
    prompt_cache: bool = True
    #: Runs beside the exclusive big model when the VRAM admission says it fits.
    companion: bool = False
    #: chat, embeddings or rerank.
    task: str = "chat"
    #: The companion this model loads as its speculative draft (None: none).
    draft: str | None = None
    #: llama-server's HTTP threads: one per connection held open at once.
    http_threads: int = 64

    @property
    def unit(self) -> str:
        """The systemd unit that serves this model."""
        prefix = COMPANION_PREFIX if self.companion else UNIT_PREFIX
        return f"{prefix}{self.name}.service"


@dataclass(frozen=True)
class Catalog:
    path: Path
    settings: Settings
    models: tuple[Model, ...] = field(default_factory=tuple)

    def resolve(self, name_or_alias: str) -> Model:
        """The model called `name_or_alias` (its name or one of its aliases)."""
        for model in self.models:
            if name_or_alias == model.name or name_or_alias in model.aliases:
                return model
        known = ", ".join(m.name for m in self.models) or "none"
        raise CatalogError(
            f"{self.path}: no model named {name_or_alias!r} — known models: {known} "
            f"(aliases work too; run 'invoke models' to list them)"
        )

    @property
    def default(self) -> Model:
        return self.resolve(self.settings.default_model)

    @property
    def big(self) -> tuple[Model, ...]:
        """The exclusive models: one of them holds the GPU at a time."""
        return tuple(m for m in self.models if not m.companion)

    @property
    def companions(self) -> tuple[Model, ...]:
        """The companions, in catalog order (the order the admission keeps them in)."""
        return tuple(m for m in self.models if m.companion)

    def load_mode(self, model: Model) -> str:
        """How `model`'s file reaches its server: stage (a local copy) or share. Companions
        (small, started beside the big model, never switched to) read the share."""
        if model.companion:
            return "share"
        return model.load or self.settings.loading.default

    def local_gguf(self, model: Model) -> Path | None:
        """Where the controller sees the model's GGUF, or None when it cannot see the share."""
        root = self.settings.controller_share_path
        return Path(root) / model.gguf if root else None

    def as_dict(self) -> dict[str, Any]:
        """The validated catalog as plain data (for --json and for Ansible extra vars)."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["settings"]["default_model"] = self.default.name  # aliases resolved
        for model, entry in zip(self.models, data["models"], strict=True):
            entry["unit"] = model.unit
        return data


# --- validation -------------------------------------------------------------------------------


@functools.cache
def schema() -> dict[str, Any]:
    """config/models.schema.json."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


class _Checker:
    """Names where a problem is (file, model, key) in every message."""

    def __init__(self, path: Path, data: Any) -> None:
        self.path = path
        self.data = data

    def where(self, parts: list[Any]) -> str:
        out, node = "", self.data
        for part in parts:
            if isinstance(part, int):
                out += f"[{part}]"
                if out.startswith("models[") and out.count("[") == 1:
                    name = node[part].get("name") if isinstance(node[part], dict) else None
                    if isinstance(name, str):
                        out += f" ({short(name)[1:-1]})"
            else:
                out += f".{part}" if out else str(part)
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
        return out or "(top level)"

    def fail(self, where: str | list[Any], problem: str, fix: str) -> CatalogError:
        place = where if isinstance(where, str) else self.where(where)
        return CatalogError(f"{self.path}: {place}: {problem} — {fix}")


def _validate(check: _Checker, data: Any) -> None:
    if data is None:
        raise check.fail("(top level)", "the file is empty", "add 'settings:' and 'models:'")
    if not isinstance(data, dict):
        raise check.fail(
            "(top level)", f"is {describe(data)}, not a mapping", "write it as key: value"
        )
    validation.refuse_control_characters(check.fail, data)
    validation.check(check.fail, schema(), data, "config/models.schema.json")


def _check_gguf_path(check: _Checker, where: list[Any], value: str) -> None:
    pure = PurePosixPath(value)
    if pure.is_absolute() or value.startswith("~"):
        raise check.fail(
            where,
            f"{short(value)} is not relative to the model share",
            "give the path inside settings.share_path, e.g. qwen/model.gguf",
        )
    if ".." in pure.parts:
        raise check.fail(
            where, f"{short(value)} escapes the model share with '..'", "remove the '..' parts"
        )


def _rules(check: _Checker, data: dict[str, Any]) -> None:
    """What the schema can't say: share-relative paths, cross-field and cross-model rules."""
    settings = data["settings"]
    hidden = validation.mount_point_problem(settings["share_path"])
    if hidden:
        raise check.fail(
            ["settings", "share_path"],
            hidden,
            "mount the share on a folder of its own, e.g. /mnt/models",
        )
    vram = with_defaults(settings["vram"], schema()["$defs"]["settings"]["properties"]["vram"])
    if vram["reserve_mib"] >= vram["budget_mib"]:
        raise check.fail(
            ["settings", "vram", "reserve_mib"],
            f"{vram['reserve_mib']} leaves nothing of budget_mib {vram['budget_mib']}",
            "make the reserve smaller than the budget",
        )
    reserved = with_defaults(settings, schema()["$defs"]["settings"])["reserved_ports"]
    owners: dict[str, str] = {}
    ports: dict[int, str] = {}
    for i, model in enumerate(data["models"]):
        _check_gguf_path(check, ["models", i, "gguf"], model["gguf"])
        for what, port in reserved.items():
            if model["port"] == port:
                raise check.fail(
                    ["models", i, "port"],
                    f"{port} is reserved for {what} (settings.reserved_ports)",
                    "pick another port",
                )
        ctx, parallel = model.get("ctx_size", 4096), model.get("parallel", 1)
        if ctx % parallel:
            raise check.fail(
                ["models", i, "ctx_size"],
                f"{ctx} does not divide into {parallel} parallel slots",
                "make ctx_size a multiple of parallel (each slot gets ctx_size / parallel)",
            )
        reasoning = model.get("reasoning")
        if reasoning is not None:
            effort = reasoning.get("effort", "medium")
            presets = reasoning.get("presets", ["low", "medium", "high"])
            if effort not in presets:
                raise check.fail(
                    ["models", i, "reasoning", "effort"],
                    f"{effort!r} is not one of its presets {presets}",
                    "add it to reasoning.presets, or pick a default effort from them",
                )
        try:
            flags.check(model.get("extra_args", []))
        except flags.FlagError as exc:
            raise check.fail(["models", i, "extra_args", exc.index], exc.problem, exc.fix) from None
        words = [("name", model["name"]), *(("aliases", a) for a in model.get("aliases", []))]
        for key, word in words:
            if word in owners:
                raise check.fail(
                    ["models", i, key],
                    f"{word!r} is already used by model {owners[word]}",
                    "names and aliases must be unique across the catalog",
                )
            owners[word] = model["name"]
        if model["port"] in ports:
            raise check.fail(
                ["models", i, "port"],
                f"{model['port']} is already used by model {ports[model['port']]}",
                "give every model its own port",
            )
        ports[model["port"]] = model["name"]
    expose = settings.get("expose", {})
    for i, cidr in enumerate(expose.get("allow_from", [])):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise check.fail(
                ["settings", "expose", "allow_from", i],
                f"{cidr!r} is not a network",
                "use CIDR form, e.g. 192.168.1.0/24 or fd00::/64",
            ) from None
    if expose.get("metrics", True) and "node_exporter" not in reserved:
        raise check.fail(
            ["settings", "reserved_ports"],
            "has no node_exporter port, and settings.expose.metrics is on",
            "add `node_exporter: 9100` (or set settings.expose.metrics: false)",
        )
    front_door = expose.get("front_door", {})
    if front_door.get("enabled") and expose.get("firewall", True) is False:
        raise check.fail(
            ["settings", "expose", "front_door", "enabled"],
            "needs settings.expose.firewall: true (the front door follows the serving model "
            "through the firewall's nftables table)",
            "turn the firewall on, or the front door off",
        )
    if front_door.get("enabled") and "proxy" not in reserved:
        raise check.fail(
            ["settings", "reserved_ports"],
            "has no proxy port, and settings.expose.front_door is on",
            "add `proxy: 8443` (the front door's port)",
        )
    control = settings.get("control", {})
    if control.get("enabled", True):
        port = control.get("port", 8090)
        taken = {p: f"reserved_ports.{what}" for what, p in reserved.items()} | {
            p: f"model {name}" for p, name in ports.items()
        }
        if port in taken:
            raise check.fail(
                ["settings", "control", "port"],
                f"{port} is already used by {taken[port]}",
                "give the control service a port of its own",
            )
    wakers = control.get("routing", False) or front_door.get("enabled", False)
    for i, model in enumerate(data["models"]):
        if not model.get("idle_unload_s") or model.get("companion"):
            continue  # a companion's is refused below
        if not control.get("enabled", True):
            raise check.fail(
                ["models", i, "idle_unload_s"],
                "needs the control service (it watches for idle and wakes the model), and "
                "settings.control.enabled is false",
                "turn the control service on, or set idle_unload_s: 0",
            )
        if not wakers:
            raise check.fail(
                ["models", i, "idle_unload_s"],
                "nothing would wake the model: the front door and routing are both off",
                "turn on settings.expose.front_door.enabled or settings.control.routing "
                "(or set idle_unload_s: 0)",
            )
    _companion_rules(check, data["models"])
    if settings["default_model"] not in owners:
        raise check.fail(
            ["settings", "default_model"],
            f"{settings['default_model']!r} is not in the catalog",
            f"use one of: {', '.join(m['name'] for m in data['models'])}",
        )
    default = next(
        m for m in data["models"]
        if settings["default_model"] in (m["name"], *m.get("aliases", []))
    )  # fmt: skip
    if default.get("companion"):
        raise check.fail(
            ["settings", "default_model"],
            f"{settings['default_model']!r} is a companion (it runs beside a big model)",
            "name one of the big models (those without companion: true)",
        )


def _companion_rules(check: _Checker, models: list[dict[str, Any]]) -> None:
    """Companions run beside the big model, never alone and never switched to; a draft names
    a chat companion."""
    companions = {m["name"]: m for m in models if m.get("companion")}
    if not any(not m.get("companion") for m in models):
        raise check.fail(
            "models", "every model is a companion",
            "leave companion: false on at least one big model (one of them holds the GPU)",
        )  # fmt: skip
    for i, model in enumerate(models):
        task = model.get("task", "chat")
        if model.get("companion"):
            if model.get("idle_unload_s"):
                raise check.fail(
                    ["models", i, "idle_unload_s"],
                    "a companion stays loaded beside the big model (it does not sleep)",
                    "remove idle_unload_s from the companion (or make it a big model)",
                )
            if model.get("load") == "stage":
                raise check.fail(
                    ["models", i, "load"],
                    "a companion reads the share (only a switch stages a big model's copy)",
                    "remove load from the companion",
                )
            if model.get("draft") is not None:
                raise check.fail(
                    ["models", i, "draft"], "a companion has no draft model of its own",
                    "give the draft to a big model",
                )  # fmt: skip
        elif task != "chat":
            raise check.fail(
                ["models", i, "task"],
                f"{task} is served by a companion, and this is a big (exclusive) model",
                "add companion: true, or use task: chat",
            )
        draft = model.get("draft")
        if draft is None:
            continue
        target = companions.get(draft)
        if target is None:
            known = ", ".join(companions) or "none"
            raise check.fail(
                ["models", i, "draft"], f"{draft!r} is not a companion in the catalog",
                f"name a model with companion: true (companions: {known})",
            )  # fmt: skip
        if target.get("task", "chat") != "chat":
            raise check.fail(
                ["models", i, "draft"],
                f"{draft!r} serves {target['task']}, a draft model must be a chat model",
                "name a chat companion with the same vocabulary",
            )


def _build(path: Path, data: dict[str, Any]) -> Catalog:
    defs = schema()["$defs"]
    raw = with_defaults(data["settings"], defs["settings"])
    vram = with_defaults(raw["vram"], defs["settings"]["properties"]["vram"])
    api = with_defaults(raw["api_key"], defs["settings"]["properties"]["api_key"])
    loading = with_defaults(raw["loading"], defs["settings"]["properties"]["loading"])
    expose = with_defaults(raw["expose"], defs["settings"]["properties"]["expose"])
    expose["allow_from"] = tuple(
        str(ipaddress.ip_network(cidr, strict=False)) for cidr in expose["allow_from"]
    )
    control = with_defaults(raw["control"], defs["settings"]["properties"]["control"])
    front = defs["settings"]["properties"]["expose"]["properties"]["front_door"]
    expose["front_door"] = FrontDoorSettings(**with_defaults(expose["front_door"], front))
    settings = Settings(
        share_path=raw["share_path"],
        controller_share_path=raw["controller_share_path"],
        bind_address=raw["bind_address"],
        default_model=raw["default_model"],
        reserved_ports=dict(raw["reserved_ports"]),
        vram=VramSettings(**vram),
        api_key=ApiKeySettings(**api),
        loading=LoadingSettings(**loading),
        expose=ExposeSettings(**expose),
        control=ControlSettings(**control),
    )
    models = []
    for entry in data["models"]:
        fields = with_defaults(entry, defs["model"])
        fields["aliases"] = tuple(fields["aliases"])
        fields["extra_args"] = tuple(fields["extra_args"])
        if fields["reasoning"] is not None:
            presets = with_defaults(fields["reasoning"], defs["model"]["properties"]["reasoning"])
            presets["presets"] = tuple(presets["presets"])
            fields["reasoning"] = Reasoning(**presets)
        if fields["sha256"]:
            fields["sha256"] = fields["sha256"].lower()
        models.append(Model(**fields))
    return Catalog(path=path, settings=settings, models=tuple(models))


# --- loading --------------------------------------------------------------------------------


def catalog_path(
    explicit: str | os.PathLike[str] | None = None, inventory_default: str | None = None
) -> Path:
    """The catalog to use: --catalog, then $LLAMAVM_CATALOG, then the inventory's, then ours."""
    for candidate in (explicit, os.environ.get(CATALOG_ENV), inventory_default):
        if candidate:
            path = Path(candidate).expanduser()
            return path if path.is_absolute() else (Path.cwd() / path)
    return DEFAULT_CATALOG


def load(path: str | os.PathLike[str]) -> Catalog:
    """Read and validate a catalog file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogError(
            f"{path}: catalog file not found — pass --catalog PATH or set ${CATALOG_ENV}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: cannot read the catalog ({exc}) — check the file") from None
    return parse(text, path)


def parse(text: str, path: Path) -> Catalog:
    """Validate catalog text; `path` is only used in messages."""
    try:
        data = yamlsafe.load(text)
    except yamlsafe.YamlLimitError as exc:
        raise CatalogError(f"{path}: refused: {exc} — write a plain catalog") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CatalogError(f"{path}: invalid YAML at {where}: {problem} — fix the syntax") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        # Anything the bounds above did not foresee still ends in one line, never a traceback.
        raise CatalogError(
            f"{path}: refused: {type(exc).__name__} — write a plain catalog"
        ) from None
    check = _Checker(path, data)
    seen = _checked_marker(text)
    if seen is None or not seen.exists():
        _validate(check, data)
    _rules(check, data)
    catalog = _build(path, data)
    if seen is not None and not seen.exists():
        _remember(seen)
    return catalog


def _checked_marker(text: str) -> Path | None:
    """Where a catalog text that passed the schema is remembered: named by the text, the
    schema and the code that checks it, so a change to any of them checks it again. Every
    command reads the catalog, and the schema check is a third of a command's start-up (an
    `invoke switch` is measured in tenths of a second). None: no cache to remember in."""
    root = paths.checked_catalogs()
    digest = hashlib.sha256(text.encode())
    try:
        for source in (SCHEMA_PATH, Path(validation.__file__), Path(__file__)):
            digest.update(source.read_bytes())
    except OSError:
        return None
    return root / digest.hexdigest()


def _remember(marker: Path) -> None:
    """Remember a text that passed; a cache that can't be written only costs time."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        marker.touch()
    except OSError:
        pass
