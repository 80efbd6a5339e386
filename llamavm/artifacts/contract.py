"""The host contract: every fact about a model host, derived once, here, on the controller.

From the validated catalog and config/host.yaml it computes the paths on the host, the service
identity, and per model the unit name, the llama-server argv (and its systemd-quoted
ExecStart), the GGUF path, the health and API URLs and the unit's dependency lists. Roles and
templates place these values; the on-host code (llamavm/host/) reads them from the file
llamavm.host.contract.CONTRACT_PATH names. Nothing downstream re-derives them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from llamavm import REPO_ROOT
from llamavm.errors import LlamavmError
from llamavm.host import contract as host_contract
from llamavm.inputs import vram as vram_mod
from llamavm.inputs import yamlsafe
from llamavm.inputs.catalog import COMPANION_PREFIX, UNIT_PREFIX, Catalog, Model

HOST_CONFIG = REPO_ROOT / "config" / "host.yaml"
UNITS_LIVE = "/etc/systemd/system"
BOOT_UNIT = "llamavm-boot.service"
SWITCH_NAME = "llamavm-switch"
PACKAGE_NAME = "llamavm-host.pyz"
#: The nftables table and set the firewall unit loads and the switch keeps current.
FIREWALL_TABLE = "llamavm"
FIREWALL_SET = "model_ports"
FIREWALL_UNIT = "llamavm-firewall.service"
#: The nftables map that sends the front door's internal port to the serving model's port.
FRONT_DOOR_MAP = "front_door"
FRONT_DOOR_UNIT = "caddy.service"
#: How long the front door keeps an idle connection to the model (under llama-server's 5 s, so
#: it is always the front door that lets one go: never a request sent on a closing one).
FRONT_DOOR_KEEPALIVE_S = 2
METRICS_UNIT = "llamavm-metrics.service"
CONTROL_UNIT = "llamavm-control.service"
#: The control service's privileged helper: one `llamavm-switch serve` per connection.
HELPER_SOCKET_UNIT = "llamavm-switchd.socket"
HELPER_SOCKET = "/run/llamavm-switchd.sock"
CONTROL_USER = "llamavm-control"
#: systemd's CacheDirectory= root: the slot directories lie under it.
CACHE_ROOT = "/var/cache"
#: Where systemd puts the service's credentials: `%d` in a unit. Never quoted.
CREDENTIAL_DIR = "%d"
_PATH_RE = re.compile(r"(/[A-Za-z0-9._@+-]+)+")
_ACCOUNT_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class HostConfig:
    """config/host.yaml, validated."""

    state_dir: str
    stage_dir: str
    slot_dir: str
    run_dir: str
    llama_cpp_prefix: str
    lib_dir: str
    bin_dir: str
    textfile_dir: str
    user: str
    group: str
    lock_timeout_s: int
    api_key_min_length: int
    front_door_port: int
    wake_port: int


def load_host_config(path: Path = HOST_CONFIG) -> HostConfig:
    """Read config/host.yaml; one-line errors naming the key."""

    def fail(where: str, problem: str, fix: str) -> LlamavmError:
        return LlamavmError(f"{path}: {where}: {problem} — {fix}")

    try:
        data = yamlsafe.load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LlamavmError(f"{path}: cannot read it ({exc}) — restore it from git") from None
    if not isinstance(data, dict):
        raise fail("(top level)", "is not a mapping", "restore it from git")
    sections = {k: data.get(k) for k in ("paths", "service", "switch", "api_key", "front_door")}
    if not all(isinstance(v, dict) for v in sections.values()):
        raise fail(
            "(top level)", "needs paths, service, switch, api_key and front_door",
            "restore it from git",
        )  # fmt: skip
    values: dict[str, Any] = {}
    for key in (
        "state_dir", "stage_dir", "slot_dir", "run_dir", "llama_cpp_prefix", "lib_dir",
        "bin_dir", "textfile_dir",
    ):  # fmt: skip
        value = sections["paths"].get(key)
        if not isinstance(value, str) or not _PATH_RE.fullmatch(value):
            raise fail(f"paths.{key}", f"{value!r} is not an absolute path", "use plain /a/b")
        values[key] = value
    if not values["slot_dir"].startswith(CACHE_ROOT + "/") or ".." in values["slot_dir"]:
        raise fail(
            "paths.slot_dir", f"{values['slot_dir']!r} is not under {CACHE_ROOT}",
            f"use a directory under {CACHE_ROOT} (systemd's CacheDirectory= creates it)",
        )  # fmt: skip
    for key in ("user", "group"):
        value = sections["service"].get(key)
        if not isinstance(value, str) or not _ACCOUNT_RE.fullmatch(value):
            raise fail(f"service.{key}", f"{value!r} is not an account name", "use e.g. llama")
        values[key] = value
    for section, key, low, high, field in (
        ("switch", "lock_timeout_s", 1, 86400, "lock_timeout_s"),
        ("api_key", "min_length", 16, 4096, "api_key_min_length"),
        ("front_door", "internal_port", 1, 65535, "front_door_port"),
        ("front_door", "wake_port", 1, 65535, "wake_port"),
    ):
        value = sections[section].get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise fail(f"{section}.{key}", f"{value!r} is not in {low}-{high}", "fix the number")
        values[field] = value
    if values["wake_port"] == values["front_door_port"]:
        raise fail(
            "front_door.wake_port", f"{values['wake_port']} is the internal port too",
            "give the wake listener a port of its own",
        )  # fmt: skip
    return HostConfig(**values)


def systemd_quote(arg: str) -> str:
    """One argv item as a quoted word of a systemd Exec= line (no specifier, no variable)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in arg):
        raise ValueError(f"control character in {arg!r}")  # the catalog refuses these first
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def _local_url_host(bind: str) -> str:
    """Where the host itself reaches a server bound to `bind`."""
    address = ipaddress.ip_address(bind)
    if address.is_unspecified:
        return "[::1]" if address.version == 6 else "127.0.0.1"
    return f"[{bind}]" if address.version == 6 else bind


#: The loading flags of a model served from the share, per llama-server generation: newer
#: builds have --load-mode (none: read, no mmap), older ones --no-mmap. The model_services role
#: asks the installed build's --help which one it has. Staged copies load with the default
#: (mmap of a local file that nothing replaces in place).
SHARE_LOAD_ARGS = {"load-mode": ["--load-mode", "none"], "no-mmap": ["--no-mmap"]}


def server_gguf(catalog: Catalog, model: Model, cfg: HostConfig) -> str:
    """The file the server reads: the staged copy, or the file on the share."""
    if catalog.load_mode(model) == "stage":
        return f"{cfg.stage_dir}/{model.name}.gguf"
    return f"{catalog.settings.share_path}/{model.gguf}"


def argv(
    catalog: Catalog,
    model: Model,
    llama_server: str,
    gguf: str,
    slot_dir: str | None = None,
    *,
    bind: str | None = None,
    share: str | None = None,
    key_file: str = f"{CREDENTIAL_DIR}/api-key",
) -> list[str]:
    """The llama-server command line of `model` (the API key file as %d/api-key), without
    the loading flags (SHARE_LOAD_ARGS); `slot_dir`: where its slots are saved (None: not).
    A container (llamavm/platforms/compose/render.py) gives its own `bind`, `share` (where the
    GGUF folder is mounted) and `key_file`."""
    s = catalog.settings
    share = s.share_path if share is None else share
    args = [
        llama_server,
        "--model", gguf,
        "--host", s.bind_address if bind is None else bind,
        "--port", str(model.port),
        "--alias", model.name,
        "--ctx-size", str(model.ctx_size),
        "--parallel", str(model.parallel),
        "--threads-http", str(model.http_threads),
        "--n-gpu-layers", str(model.n_gpu_layers),
        "--n-cpu-moe", str(model.n_cpu_moe),
        "--cache-type-k", model.cache_type,
        "--cache-type-v", model.cache_type,
        "--fit", "off",
    ]  # fmt: skip
    if s.api_key.policy == "required":
        args += ["--api-key-file", key_file]
    if model.reasoning is not None:
        args += [
            "--reasoning-format", model.reasoning.format,
            "--reasoning-effort", model.reasoning.effort,
        ]  # fmt: skip
    if slot_dir:
        args += ["--slot-save-path", slot_dir]
    if model.task == "embeddings":
        args += ["--embeddings"]
    elif model.task == "rerank":
        args += ["--reranking"]
    if model.draft is not None:
        draft = catalog.resolve(model.draft)
        args += [
            "--spec-type", "draft-simple",
            "--model-draft", f"{share}/{draft.gguf}",
            "--gpu-layers-draft", str(draft.n_gpu_layers),
            "--cache-type-k-draft", draft.cache_type,
            "--cache-type-v-draft", draft.cache_type,
        ]  # fmt: skip
    return [*args, *model.extra_args, "--metrics"]


def exec_line(args: list[str]) -> str:
    """argv as an Exec= value: every word quoted, except the credential path (a specifier)."""
    words = []
    for arg in args:
        if arg.startswith(f"{CREDENTIAL_DIR}/"):
            words.append(arg)
        else:
            words.append(systemd_quote(arg))
    return " ".join(words)


def front_door_pool_flag(catalog: Catalog, cfg: HostConfig) -> str | None:
    """The file whose presence sends the front door's requests through its second set of kept
    connections to the model (the switch turns it over as the front door leaves a model), or
    None: no connection is kept. Kept only with the control service, whose wake listener holds
    the front door's requests during a switch (see firewall.py)."""
    s = catalog.settings
    if not (s.expose.front_door.enabled and s.expose.firewall and s.control.enabled):
        return None
    return f"{cfg.run_dir}/front-door/pool-b"


def firewall(catalog: Catalog, cfg: HostConfig) -> dict[str, Any]:
    """What the model host's nftables rule set opens: SSH always, the active model's port
    (kept in a set by the switch), the enabled services; the model and service ports only to
    `allow_from` when it lists networks."""
    s = catalog.settings
    networks = [ipaddress.ip_network(n) for n in s.expose.allow_from]
    services = {}
    if s.expose.metrics:
        services["node_exporter"] = s.reserved_ports["node_exporter"]
    if s.control.enabled:
        services["control"] = s.control.port
    front = s.expose.front_door.enabled
    if front:
        services["front_door"] = s.reserved_ports["proxy"]
        for port, what in ((cfg.front_door_port, "internal_port"), (cfg.wake_port, "wake_port")):
            clash = next((m for m in catalog.models if m.port == port), None)
            if clash:
                raise LlamavmError(
                    f"{catalog.path}: models: {clash.name}: port {clash.port} is the front "
                    f"door's {what} (config/host.yaml front_door.{what}) — pick another port"
                )
    return {
        "enabled": s.expose.firewall,
        "unit": FIREWALL_UNIT,
        "table": FIREWALL_TABLE,
        "set": FIREWALL_SET,
        "ssh_port": s.reserved_ports.get("ssh", 22),
        "service_ports": services,
        "model_ports": sorted(m.port for m in catalog.models),
        # The front door proxies to 127.0.0.1:internal_port; the map redirects it (table inet
        # llamavm, output nat) to the serving model's port, switched with the open port.
        "front_door": {
            "enabled": front,
            "map": FRONT_DOOR_MAP,
            "chain": f"{FRONT_DOOR_MAP}_nat",
            "internal_port": cfg.front_door_port,
            "wake_port": cfg.wake_port,
            "pool_flag": front_door_pool_flag(catalog, cfg),
        },
        "allow_from": {
            "ipv4": [str(n) for n in networks if n.version == 4],
            "ipv6": [str(n) for n in networks if n.version == 6],
        },
    }


def build(
    catalog: Catalog,
    vram: dict[str, dict[str, Any]],
    host: HostConfig | None = None,
) -> dict[str, Any]:
    """The contract of every host served by `catalog` (JSON-ready; keys sorted on output)."""
    cfg = host or load_host_config()
    settings = catalog.settings
    pool_flag = front_door_pool_flag(catalog, cfg)
    config_dir = str(host_contract.CONTRACT_PATH.parent)
    if PurePosixPath(settings.api_key.file).parent != PurePosixPath(config_dir):
        raise LlamavmError(
            f"{catalog.path}: settings.api_key.file: {settings.api_key.file!r} is not in "
            f"{config_dir} — keep the key in {config_dir}/"
        )
    prefix = cfg.llama_cpp_prefix
    switch = f"{cfg.bin_dir}/{SWITCH_NAME}"
    llama_server = f"{prefix}/current/bin/llama-server"
    paths = {
        "contract": str(host_contract.CONTRACT_PATH),
        "units_staged": f"{config_dir}/units",
        "units_live": UNITS_LIVE,
        "state": f"{cfg.state_dir}/state.json",
        "sha_cache": f"{cfg.state_dir}/sha256.json",
        "outcomes": f"{cfg.state_dir}/tx",
        "run_dir": cfg.run_dir,
        "progress": f"{cfg.run_dir}/tx",
        "lock": f"{cfg.run_dir}/lock/switch.lock",
        "failpoints": f"{cfg.run_dir}/failpoints.json",
        "counters": f"{cfg.state_dir}/counters.json",
        "llama_server": llama_server,
        "switch": switch,
    }
    url_host = _local_url_host(settings.bind_address)
    # Only the big models exclude one another; companions run beside whichever serves.
    units = [m.unit for m in catalog.big]
    admitted = vram_mod.admission(
        catalog, {m.name: vram.get(m.name, {}).get("total_mib") for m in catalog.models}
    )
    models: list[dict[str, Any]] = []
    companions: list[dict[str, Any]] = []
    for model in catalog.models:
        index = units.index(model.unit) if not model.companion else 0
        base_url = f"http://{url_host}:{model.port}"
        load = catalog.load_mode(model)
        gguf = server_gguf(catalog, model, cfg)
        # A companion is not stopped by a switch: it has no slots to keep across one.
        keep_slots = model.prompt_cache and not model.companion
        slot_dir = f"{cfg.slot_dir}/{model.name}" if keep_slots else None
        args = argv(catalog, model, llama_server, gguf, slot_dir)
        mounts = cfg.stage_dir if load == "stage" else settings.share_path
        if model.draft is not None and mounts != settings.share_path:
            mounts = f"{mounts} {settings.share_path}"  # the draft is read from the share
        (companions if model.companion else models).append(
            {
                "name": model.name,
                "aliases": list(model.aliases),
                "unit": model.unit,
                "port": model.port,
                "gguf": gguf,
                "source": f"{settings.share_path}/{model.gguf}",
                "gguf_in_share": model.gguf,
                "load": load,
                "base_url": base_url,
                "health_url": f"{base_url}/health",
                "description": model.description,
                "reasoning": (
                    {"effort": model.reasoning.effort, "presets": list(model.reasoning.presets)}
                    if model.reasoning
                    else None
                ),
                "ctx_size": model.ctx_size,
                "parallel": model.parallel,
                "health_timeout_s": model.health_timeout_s,
                "idle_unload_s": model.idle_unload_s,
                "companion": model.companion,
                "task": model.task,
                "draft": model.draft,
                # Which companions run beside this model, and why the others do not.
                "companions": admitted.get(model.name, {}).get("beside", []),
                "companions_stopped": admitted.get(model.name, {}).get("stopped", {}),
                "slot_dir": slot_dir,
                "size_bytes": model.size_bytes,
                "sha256": model.sha256,
                "vram": vram.get(model.name, {}),
                "argv": args,
                "systemd": {
                    "description": f"llamavm model {model.name} (llama-server, port {model.port})",
                    "exec_start": exec_line(args),
                    "load_args": {
                        dialect: exec_line(extra) if load == "share" else ""
                        for dialect, extra in SHARE_LOAD_ARGS.items()
                    },
                    "exec_start_post": exec_line([switch, "gate", model.name]),
                    "conflicts": ([] if model.companion else [u for u in units if u != model.unit]),
                    # Conflicts= adds no ordering: one After= chain makes every stop/start pair
                    # stop first, so a new server never loads beside the old one.
                    "after": [] if model.companion else units[:index],
                    # A staged model needs only local disk: it starts with the share away.
                    "requires_mounts_for": mounts,
                    "read_only_paths": settings.share_path,
                    # systemd creates the slot directory for the model's user (0700).
                    "cache_directory": (
                        slot_dir.removeprefix(CACHE_ROOT + "/") if slot_dir else None
                    ),
                    "load_credential": (
                        f"api-key:{settings.api_key.file}"
                        if settings.api_key.policy == "required"
                        else None
                    ),
                    "timeout_start_s": model.health_timeout_s + 10,
                    "syslog_identifier": model.unit.removesuffix(".service"),
                },
            }
        )
    return {
        "version": host_contract.VERSION,
        "paths": paths,
        "install": {
            "config_dir": config_dir,
            "state_dir": cfg.state_dir,
            "lib_dir": cfg.lib_dir,
            "host_package": f"{cfg.lib_dir}/{PACKAGE_NAME}",
            "llama_cpp_prefix": prefix,
        },
        "service": {"user": cfg.user, "group": cfg.group},
        "api_key": {
            "policy": settings.api_key.policy,
            "file": settings.api_key.file,
            "min_length": cfg.api_key_min_length,
        },
        "switch": {"lock_timeout_s": cfg.lock_timeout_s},
        "share_path": settings.share_path,
        "loading": {
            "stage_dir": cfg.stage_dir,
            "stage_cap_bytes": settings.loading.stage_cap_gib << 30,
            "share_stall_s": settings.loading.share_stall_s,
        },
        "default_model": catalog.default.name,
        "boot_unit": BOOT_UNIT,
        # Every unit a catalog can name, this one or an earlier one: what is llamavm's to prune.
        "unit_globs": [f"{UNIT_PREFIX}*.service", f"{COMPANION_PREFIX}*.service"],
        "firewall": firewall(catalog, cfg),
        "front_door": {
            "enabled": settings.expose.front_door.enabled,
            "unit": FRONT_DOOR_UNIT,
            "port": settings.reserved_ports.get("proxy"),
            "internal_port": cfg.front_door_port,
            "wait_s": settings.expose.front_door.wait_s,
            "drain_s": settings.expose.front_door.drain_s,
            "pool_flag": pool_flag,
            "keepalive_s": FRONT_DOOR_KEEPALIVE_S if pool_flag else 0,
            "tls": settings.expose.front_door.tls,
            "companions": front_door_companions(catalog),
        },
        "metrics": {
            "enabled": settings.expose.metrics,
            "port": settings.reserved_ports.get("node_exporter")
            if settings.expose.metrics
            else None,
            "textfile": f"{cfg.textfile_dir}/llamavm.prom",
            "interval_s": settings.expose.metrics_interval_s,
            "unit": METRICS_UNIT,
        },
        "control": {
            "enabled": settings.control.enabled,
            "routing": settings.control.routing,
            "port": settings.control.port if settings.control.enabled else None,
            "bind_address": settings.bind_address,
            "unit": CONTROL_UNIT,
            "user": CONTROL_USER,
            "helper_socket": HELPER_SOCKET,
            "helper_socket_unit": HELPER_SOCKET_UNIT,
            # A sleeping model's wake listener (127.0.0.1 only; the front door's map points
            # there while it sleeps), and how long a waking request waits for the model.
            "wake_port": cfg.wake_port if settings.expose.front_door.enabled else None,
            "wake_bind": "127.0.0.1",
            "wake_wait_s": settings.expose.front_door.wait_s,
        },
        "models": models,
        "companions": companions,
    }


def front_door_companions(catalog: Catalog) -> list[dict[str, Any]]:
    """What the front door sends beside the big model: per task, the paths and the port of the
    catalog's first companion of that task (the control service's rule for a request that
    names no model)."""
    routes = []
    for task, paths in host_contract.COMPANION_PATHS.items():
        model = next((m for m in catalog.models if m.companion and m.task == task), None)
        if model is not None:
            routes.append({"name": model.name, "task": task, "port": model.port,
                           "paths": list(paths)})  # fmt: skip
    return routes
