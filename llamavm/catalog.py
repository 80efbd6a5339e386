"""The model catalog: load config/models.yaml, validate every rule, hand out typed models.

Every problem is reported as one line naming the file, the model and the key, what is wrong
and what to do, raised as CatalogError (exit code 2 at the CLI edge).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from llamavm import REPO_ROOT
from llamavm.errors import LlamavmError

#: Environment variable that overrides the catalog path (the --catalog flag wins over it).
CATALOG_ENV = "LLAMAVM_CATALOG"
DEFAULT_CATALOG = REPO_ROOT / "config" / "models.yaml"

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
API_KEY_POLICIES = ("none", "required")

#: llama-server flags that llamavm sets itself from catalog keys; they may not be repeated in
#: extra_args (a second value would silently win or clash), with the key to use instead.
MANAGED_FLAGS = {
    "-m": "gguf",
    "--model": "gguf",
    "--host": "settings.bind_address",
    "--port": "port",
    "-c": "ctx_size",
    "--ctx-size": "ctx_size",
    "-ngl": "n_gpu_layers",
    "--gpu-layers": "n_gpu_layers",
    "--n-gpu-layers": "n_gpu_layers",
    "--n-cpu-moe": "n_cpu_moe",
    "-ncmoe": "n_cpu_moe",
    "-np": "parallel",
    "--parallel": "parallel",
    "-ctk": "cache_type",
    "--cache-type-k": "cache_type",
    "-ctv": "cache_type",
    "--cache-type-v": "cache_type",
    "--api-key-file": "settings.api_key",
    "--metrics": "(always on)",
    "--fit": "(always off: the catalog pins context and layers)",
    "-fit": "(always off: the catalog pins context and layers)",
    "--alias": "name",
    "-a": "name",
}
#: Flags that would put a secret on a command line, readable by every user in `ps`.
SECRET_FLAGS = ("--api-key", "--hf-token", "-hft")


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
class Settings:
    share_path: str
    controller_share_path: str | None
    bind_address: str
    default_model: str
    reserved_ports: dict[str, int]
    vram: VramSettings
    api_key: ApiKeySettings


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

    @property
    def unit(self) -> str:
        """The systemd unit that serves this model."""
        return f"llamavm-model-{self.name}.service"


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


# --- field specs -----------------------------------------------------------------------------

# key -> (type(s), required, default)
_SETTINGS_KEYS: dict[str, tuple[type | tuple[type, ...], bool, Any]] = {
    "share_path": (str, True, None),
    "controller_share_path": ((str, type(None)), False, None),
    "bind_address": (str, False, "0.0.0.0"),
    "default_model": (str, True, None),
    "reserved_ports": (dict, False, {"ssh": 22}),
    "vram": (dict, True, None),
    "api_key": (dict, False, {"policy": "required", "file": "/etc/llamavm/api-key"}),
}
_VRAM_KEYS: dict[str, tuple[type | tuple[type, ...], bool, Any]] = {
    "budget_mib": (int, True, None),
    "reserve_mib": (int, False, 1024),
    "compute_mib": (int, False, 1024),
}
_API_KEY_KEYS: dict[str, tuple[type | tuple[type, ...], bool, Any]] = {
    "policy": (str, True, None),
    "file": (str, False, "/etc/llamavm/api-key"),
}
_MODEL_KEYS: dict[str, tuple[type | tuple[type, ...], bool, Any]] = {
    "name": (str, True, None),
    "description": (str, False, ""),
    "aliases": (list, False, []),
    "gguf": (str, True, None),
    "port": (int, True, None),
    "ctx_size": (int, False, 4096),
    "n_gpu_layers": (int, False, 999),
    "n_cpu_moe": (int, False, 0),
    "parallel": (int, False, 1),
    "cache_type": (str, False, "f16"),
    "extra_args": (list, False, []),
    "size_bytes": ((int, type(None)), False, None),
    "sha256": ((str, type(None)), False, None),
    "health_timeout_s": (int, False, 300),
    "vram_mib": ((int, type(None)), False, None),
}

_TYPE_WORDS = {
    str: "a string",
    int: "an integer",
    list: "a list",
    dict: "a mapping",
    type(None): "null",
}


def _type_word(types: type | tuple[type, ...]) -> str:
    if not isinstance(types, tuple):
        types = (types,)
    return " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in types)


class _Checker:
    """Collects the context (file, model) so each message names where the problem is."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str, fix: str) -> CatalogError:
        return CatalogError(f"{self.path}: {where}: {problem} — {fix}")

    def section(
        self,
        data: Any,
        spec: dict[str, tuple[type | tuple[type, ...], bool, Any]],
        where: str,
    ) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(where, f"is {_describe(data)}, not a mapping", "write it as key: value")
        unknown = sorted(set(map(str, data)) - set(spec))
        if unknown:
            raise self.fail(
                f"{where}.{unknown[0]}",
                "unknown key",
                f"remove it or fix its spelling (allowed keys: {', '.join(spec)})",
            )
        out: dict[str, Any] = {}
        for key, (types, required, default) in spec.items():
            if key not in data:
                if required:
                    raise self.fail(f"{where}.{key}", "is missing", "this key is required")
                out[key] = default
                continue
            value = data[key]
            if not _is_instance(value, types):
                raise self.fail(
                    f"{where}.{key}",
                    f"{value!r} is {_describe(value)}",
                    f"it must be {_type_word(types)}",
                )
            out[key] = value
        return out


def _is_instance(value: Any, types: type | tuple[type, ...]) -> bool:
    if not isinstance(types, tuple):
        types = (types,)
    # YAML booleans are ints in Python; never accept them where a number is wanted.
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _TYPE_WORDS.get(type(value), type(value).__name__)


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
    check = _Checker(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CatalogError(f"{path}: invalid YAML at {where}: {problem} — fix the syntax") from None
    if data is None:
        raise check.fail("(top level)", "the file is empty", "add 'settings:' and 'models:'")
    top = check.section(
        data,
        {"settings": (dict, True, None), "models": (list, True, None)},
        "(top level)",
    )
    settings = _settings(check, top["settings"])
    models = tuple(_model(check, entry, i, settings) for i, entry in enumerate(top["models"]))
    if not models:
        raise check.fail("models", "the list is empty", "add at least one model")
    _cross_checks(check, settings, models)
    return Catalog(path=path, settings=settings, models=models)


def _settings(check: _Checker, data: Any) -> Settings:
    raw = check.section(data, _SETTINGS_KEYS, "settings")
    vram = check.section(raw["vram"], _VRAM_KEYS, "settings.vram")
    for key in ("budget_mib", "reserve_mib", "compute_mib"):
        if vram[key] < 0 or (key == "budget_mib" and vram[key] == 0):
            raise check.fail(f"settings.vram.{key}", f"{vram[key]} is not positive", "use MiB > 0")
    if vram["reserve_mib"] >= vram["budget_mib"]:
        raise check.fail(
            "settings.vram.reserve_mib",
            f"{vram['reserve_mib']} leaves nothing of budget_mib {vram['budget_mib']}",
            "make the reserve smaller than the budget",
        )
    api = check.section(raw["api_key"], _API_KEY_KEYS, "settings.api_key")
    if api["policy"] not in API_KEY_POLICIES:
        raise check.fail(
            "settings.api_key.policy",
            f"{api['policy']!r} is not a policy",
            f"use one of: {', '.join(API_KEY_POLICIES)}",
        )
    if not api["file"].startswith("/"):
        raise check.fail(
            "settings.api_key.file", f"{api['file']!r} is relative", "use an absolute path"
        )
    for key in ("share_path",):
        if not raw[key].startswith("/"):
            raise check.fail(f"settings.{key}", f"{raw[key]!r} is relative", "use an absolute path")
    reserved: dict[str, int] = {}
    for what, port in raw["reserved_ports"].items():
        if not _is_instance(port, int) or not 1 <= port <= 65535:
            raise check.fail(
                f"settings.reserved_ports.{what}",
                f"{port!r} is not a port number",
                "use an integer in 1-65535",
            )
        reserved[str(what)] = port
    return Settings(
        share_path=raw["share_path"],
        controller_share_path=raw["controller_share_path"],
        bind_address=raw["bind_address"],
        default_model=raw["default_model"],
        reserved_ports=reserved,
        vram=VramSettings(**vram),
        api_key=ApiKeySettings(**api),
    )


def _model(check: _Checker, data: Any, index: int, settings: Settings) -> Model:
    label = f"models[{index}]"
    if isinstance(data, dict) and isinstance(data.get("name"), str):
        label = f"models[{index}] ({data['name']})"
    raw = check.section(data, _MODEL_KEYS, label)
    name = raw["name"]
    if not NAME_RE.match(name):
        raise check.fail(
            f"{label}.name",
            f"{name!r} is not a valid name",
            "use lower-case letters, digits, '.', '_' or '-' (it becomes a systemd unit name)",
        )
    for i, alias in enumerate(raw["aliases"]):
        if not isinstance(alias, str) or not NAME_RE.match(alias):
            raise check.fail(
                f"{label}.aliases[{i}]",
                f"{alias!r} is not a valid alias",
                "use lower-case letters, digits, '.', '_' or '-'",
            )
    _check_share_path(check, f"{label}.gguf", raw["gguf"])
    port = raw["port"]
    if not 1024 <= port <= 65535:
        raise check.fail(
            f"{label}.port",
            f"{port} is outside 1024-65535",
            "pick an unprivileged port that no other model or service uses",
        )
    for what, reserved in settings.reserved_ports.items():
        if port == reserved:
            raise check.fail(
                f"{label}.port",
                f"{port} is reserved for {what} (settings.reserved_ports)",
                "pick another port",
            )
    for key, minimum in (
        ("ctx_size", 1),
        ("parallel", 1),
        ("n_gpu_layers", 0),
        ("n_cpu_moe", 0),
        ("health_timeout_s", 1),
    ):
        if raw[key] < minimum:
            raise check.fail(
                f"{label}.{key}", f"{raw[key]} is below {minimum}", f"use {minimum} or more"
            )
    if raw["ctx_size"] % raw["parallel"]:
        raise check.fail(
            f"{label}.ctx_size",
            f"{raw['ctx_size']} does not divide into {raw['parallel']} parallel slots",
            "make ctx_size a multiple of parallel (each slot gets ctx_size / parallel)",
        )
    if raw["cache_type"] not in CACHE_TYPES:
        raise check.fail(
            f"{label}.cache_type",
            f"{raw['cache_type']!r} is not a KV cache type",
            f"use one of: {', '.join(CACHE_TYPES)}",
        )
    for key in ("size_bytes", "vram_mib"):
        if raw[key] is not None and raw[key] <= 0:
            raise check.fail(
                f"{label}.{key}", f"{raw[key]} is not positive", "use a number > 0 or remove it"
            )
    if raw["sha256"] is not None:
        raw["sha256"] = raw["sha256"].lower()
        if not SHA256_RE.match(raw["sha256"]):
            raise check.fail(
                f"{label}.sha256",
                f"{raw['sha256']!r} is not a SHA-256 digest",
                "use the 64 hex digits that 'sha256sum FILE' prints, or remove it",
            )
    _check_extra_args(check, f"{label}.extra_args", raw["extra_args"])
    raw["aliases"] = tuple(raw["aliases"])
    raw["extra_args"] = tuple(raw["extra_args"])
    return Model(**raw)


def _check_share_path(check: _Checker, where: str, value: str) -> None:
    pure = PurePosixPath(value)
    if not value or pure.is_absolute() or value.startswith("~"):
        raise check.fail(
            where,
            f"{value!r} is not relative to the model share",
            "give the path inside settings.share_path, e.g. qwen/model.gguf",
        )
    if ".." in pure.parts:
        raise check.fail(
            where, f"{value!r} escapes the model share with '..'", "remove the '..' parts"
        )
    if not value.endswith(".gguf"):
        raise check.fail(where, f"{value!r} is not a .gguf file", "point at the GGUF file itself")


def _check_extra_args(check: _Checker, where: str, args: list[Any]) -> None:
    for i, arg in enumerate(args):
        if not isinstance(arg, str):
            raise check.fail(
                f"{where}[{i}]", f"{arg!r} is {_describe(arg)}", "quote it as a string"
            )
        flag = arg.split("=", 1)[0]
        if flag in SECRET_FLAGS:
            raise check.fail(
                f"{where}[{i}]",
                f"{flag} would put a secret on the command line",
                "set settings.api_key.policy: required (the key goes in a 0600 file)",
            )
        if flag in MANAGED_FLAGS:
            raise check.fail(
                f"{where}[{i}]",
                f"{flag} is set by llamavm",
                f"use the catalog key {MANAGED_FLAGS[flag]} instead",
            )


def _cross_checks(check: _Checker, settings: Settings, models: tuple[Model, ...]) -> None:
    owners: dict[str, str] = {}
    ports: dict[int, str] = {}
    for i, model in enumerate(models):
        label = f"models[{i}] ({model.name})"
        for key, word in [("name", model.name), *(("aliases", a) for a in model.aliases)]:
            if word in owners:
                raise check.fail(
                    f"{label}.{key}",
                    f"{word!r} is already used by model {owners[word]}",
                    "names and aliases must be unique across the catalog",
                )
            owners[word] = model.name
        if model.port in ports:
            raise check.fail(
                f"{label}.port",
                f"{model.port} is already used by model {ports[model.port]}",
                "give every model its own port",
            )
        ports[model.port] = model.name
    if settings.default_model not in owners:
        raise check.fail(
            "settings.default_model",
            f"{settings.default_model!r} is not in the catalog",
            f"use one of: {', '.join(m.name for m in models)}",
        )
