"""The catalog as a Docker Compose project (issue 25): render, build, and the switch transaction
with containers instead of systemd units.

`render` writes, from the validated catalog and an inventory's `llamavm_compose_*` settings, a
project folder: a Dockerfile (llama.cpp from the same pinned source archive and the same cmake
flags as the llama_cpp role — a portable build, CUDA when the host has a GPU), an entrypoint,
and a `compose.yaml` with one service per model, each in a profile of its own: the GGUF folder
mounted read-only, the GPU requested the Compose way (`deploy.resources.reservations.devices`,
driver nvidia) unless the host is CPU-only, the port on the bind address, the API key as a
secret file, a healthcheck on /health, an unprivileged read-only container.

One big model at a time is enforced twice: the switch holds a lock and stops the old container
before it starts the new one, and every big model's entrypoint takes an exclusive lock on a
volume all of them share — a container started by hand beside a serving one says why and exits
(status 0, so `restart: on-failure` does not loop it) instead of loading a second model.

The transaction (`switch`, `stop`) runs on the controller and drives the engine with its own
CLI (`docker` or `podman`, and `docker compose`, `docker-compose` or `podman compose`), locally
or through DOCKER_HOST (`ssh://user@gpu-box`): the same semantics as a systemd host's — checks
first, stop the old, start the new, a health gate, a roll back to the old model on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llamavm import REPO_ROOT, paths
from llamavm.artifacts import contract
from llamavm.errors import LlamavmError
from llamavm.host import EXIT_LOCK, store
from llamavm.host.contract import HostError
from llamavm.inputs import catalog as catalog_mod
from llamavm.inputs.inventory import Inventory

#: The compose project name (`-p`), the image's repository, the container names' prefix.
PROJECT = "llamavm"
IMAGE = "llamavm/llama-server"
#: The account llama-server runs as in the container (no passwd entry needed).
UID = 10001
#: Where the image puts llama.cpp, and where a container sees the models and the API key.
PREFIX = "/opt/llama.cpp"
MODELS = "/models"
KEY_FILE = "/run/secrets/api_key"
#: The volume every big model's container shares, and the lock its entrypoint takes there.
LOCK_VOLUME = "gpu-lock"
LOCK_DIR = "/run/llamavm-lock"
LABEL = "io.llamavm"
ENTRYPOINT = "llamavm-entrypoint"
ROLE_DEFAULTS = REPO_ROOT / "ansible" / "roles" / "llama_cpp" / "defaults" / "main.yml"
ROLE_PREFLIGHT = REPO_ROOT / "ansible" / "roles" / "llama_cpp" / "tasks" / "preflight.yml"
#: Renders and builds are keyed by this: a change here re-renders every project.
RECIPE = 1
ENGINES = ("auto", "docker", "podman")
#: The CUDA architectures a GPU image is built for when the inventory names none: Turing to
#: Blackwell (one image for any current card; name yours to build faster).
CUDA_ARCHITECTURES = "75;80;86;89;90;120"
BUILD_IMAGE = "nvidia/cuda:12.8.1-devel-ubuntu24.04"
RUNTIME_IMAGE = "nvidia/cuda:12.8.1-runtime-ubuntu24.04"
CPU_IMAGE = "debian:12"
#: What a base image may be named: [registry[:port]/]name[:tag][@digest], nothing else.
IMAGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")


@dataclass(frozen=True)
class Site:
    """A compose host's settings (an inventory's llamavm_compose_*, with their defaults)."""

    inventory: str
    dir: Path
    engine: str
    engine_host: str
    models_dir: str
    gpu: bool
    cuda_architectures: str
    build_image: str
    runtime_image: str
    apt: bool
    bind_address: str
    #: Where the controller asks a model's /health (the host's address, or the bind address).
    probe_host: str


def state_root() -> Path:
    return paths.compose_projects()


def _setting(inv: Inventory, key: str, kind: type, default: Any, what: str) -> Any:
    value = inv.settings.get(key, default)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok or (kind is str and any(ord(c) < 0x20 for c in value)):
        where = inv.sources.get(key, inv.path)
        raise LlamavmError(f"{where}: {key}: {value!r} — {what}", code=2)
    return value


def site(inv: Inventory, cat: catalog_mod.Catalog, host_address: str | None = None) -> Site:
    """The compose settings of `inv`, checked: each bad value is one line naming its file."""
    name = inv.path.name
    folder = _setting(inv, "llamavm_compose_dir", str, str(state_root() / name),
                      "the project folder: an absolute path")  # fmt: skip
    if not Path(folder).is_absolute():
        where = inv.sources.get("llamavm_compose_dir", inv.path)
        raise LlamavmError(
            f"{where}: llamavm_compose_dir: {folder!r} — use an absolute path", code=2
        )
    engine = _setting(inv, "llamavm_compose_engine", str, "auto", f"one of {', '.join(ENGINES)}")
    if engine not in ENGINES:
        where = inv.sources.get("llamavm_compose_engine", inv.path)
        raise LlamavmError(
            f"{where}: llamavm_compose_engine: {engine!r} — use one of {', '.join(ENGINES)}", code=2
        )
    engine_host = _setting(
        inv, "llamavm_compose_engine_host", str, "", "unix:///PATH, ssh://USER@HOST or ''"
    )
    if engine_host and not engine_host.startswith(("unix://", "ssh://", "tcp://")):
        where = inv.sources.get("llamavm_compose_engine_host", inv.path)
        raise LlamavmError(
            f"{where}: llamavm_compose_engine_host: {engine_host!r} — use unix:///PATH, "
            "ssh://USER@HOST or tcp://HOST:PORT",
            code=2,
        )
    models_dir = _setting(inv, "llamavm_compose_models_dir", str, cat.settings.share_path,
                          "the GGUF folder on the engine's machine: an absolute path")  # fmt: skip
    if not models_dir.startswith("/") or ":" in models_dir:
        where = inv.sources.get("llamavm_compose_models_dir", inv.path)
        raise LlamavmError(
            f"{where}: llamavm_compose_models_dir: {models_dir!r} — an absolute path without ':'",
            code=2,
        )
    gpu = _setting(inv, "llamavm_compose_gpu", bool, True, "true (an NVIDIA GPU) or false")
    archs = _setting(inv, "llamavm_compose_cuda_architectures", str, CUDA_ARCHITECTURES,
                     'CUDA architectures like "90" or "86;89"')  # fmt: skip
    if not archs or not all(a.isdigit() for a in archs.split(";")):
        where = inv.sources.get("llamavm_compose_cuda_architectures", inv.path)
        raise LlamavmError(
            f'{where}: llamavm_compose_cuda_architectures: {archs!r} — like "90" or "86;89"', code=2
        )
    default_build = BUILD_IMAGE if gpu else CPU_IMAGE
    default_runtime = RUNTIME_IMAGE if gpu else CPU_IMAGE
    build_image = _setting(inv, "llamavm_compose_build_image", str, default_build,
                           "the image llama.cpp is compiled in")  # fmt: skip
    runtime_image = _setting(inv, "llamavm_compose_runtime_image", str, default_runtime,
                             "the image llama-server runs in")  # fmt: skip
    for key, image in (("llamavm_compose_build_image", build_image),
                       ("llamavm_compose_runtime_image", runtime_image)):  # fmt: skip
        if not IMAGE_REF.match(image):
            where = inv.sources.get(key, inv.path)
            raise LlamavmError(
                f"{where}: {key}: {image!r} — an image reference like "
                "nvidia/cuda:12.8.1-devel-ubuntu24.04 (no spaces or quotes)",
                code=2,
            )
    apt = _setting(inv, "llamavm_compose_apt", bool, True,
                   "true: the Dockerfile installs the build tools with apt; false: the images "
                   "have them")  # fmt: skip
    bind = _setting(inv, "llamavm_compose_bind_address", str, cat.settings.bind_address,
                    "an IP address of the engine's machine, or 0.0.0.0")  # fmt: skip
    try:
        address = ipaddress.ip_address(bind)
    except ValueError:
        where = inv.sources.get("llamavm_compose_bind_address", inv.path)
        raise LlamavmError(
            f"{where}: llamavm_compose_bind_address: {bind!r} — an IP address, or 0.0.0.0", code=2
        ) from None
    probe = host_address or "127.0.0.1"
    if not address.is_unspecified:
        probe = bind
    return Site(
        inventory=name, dir=Path(folder), engine=engine, engine_host=engine_host,
        models_dir=models_dir, gpu=gpu, cuda_architectures=archs, build_image=build_image,
        runtime_image=runtime_image, apt=apt, bind_address=bind, probe_host=probe,
    )  # fmt: skip


# --- render -------------------------------------------------------------------------------------


def build_flags(gpu: bool) -> dict[str, str]:
    """The llama_cpp role's cmake flags for a portable build (llama_cpp_native: false, no
    ccache): its own base flags, templated by Ansible from the role's preflight task, with
    its portable CPU flags; the CUDA flags are added in the Dockerfile from build arguments."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar

    defaults = yaml.safe_load(ROLE_DEFAULTS.read_text(encoding="utf-8"))
    tasks = yaml.safe_load(ROLE_PREFLIGHT.read_text(encoding="utf-8"))
    found = [t["vars"]["__llama_cpp_base_flags"] for t in tasks
             if "__llama_cpp_base_flags" in (t.get("vars") or {})]  # fmt: skip
    if len(found) != 1:
        raise LlamavmError(f"{ROLE_PREFLIGHT}: no single task with __llama_cpp_base_flags")
    variables = {**defaults, "llama_cpp_native": False, "llama_cpp_ccache": False,
                 "__llama_cpp_cuda": gpu}  # fmt: skip
    templar = Templar(loader=DataLoader(), variables=variables)
    try:
        from ansible.template import trust_as_template
    except ImportError:  # ansible-core < 2.19 templates any string

        def trust_as_template(value: str) -> str:
            return value

    flags = {k: str(templar.template(trust_as_template(str(v)))) for k, v in found[0].items()}
    return {**flags, **defaults["llama_cpp_portable_cpu_flags"]}


def _dockerfile(site: Site, archive: str, label: str) -> str:
    flags = build_flags(site.gpu)
    flags.pop("GGML_CUDA")
    defaults = yaml.safe_load(ROLE_DEFAULTS.read_text(encoding="utf-8"))
    fa = "ON" if defaults.get("llama_cpp_cuda_flash_attention", True) else "OFF"
    cmake = " \\\n        ".join(f"'-D{k}={v}'" for k, v in flags.items())
    apt_build = "build-essential cmake pkg-config"
    return f"""\
# Rendered by `invoke compose.render` (llamavm/compose.py) — render again, don't edit.
# llama-server from {label}, the source archive beside this file, with the llama_cpp role's
# cmake flags for a portable build; CUDA when GGML_CUDA=ON, for CUDA_ARCHITECTURES.
ARG BUILD_IMAGE={site.build_image}
ARG RUNTIME_IMAGE={site.runtime_image}

FROM ${{BUILD_IMAGE}} AS build
ARG GGML_CUDA={"ON" if site.gpu else "OFF"}
ARG CUDA_ARCHITECTURES="{site.cuda_architectures}"
# 1: install the build tools with apt; 0: the build image has them (offline builds).
ARG APT_INSTALL={1 if site.apt else 0}
RUN if [ "$APT_INSTALL" = 1 ]; then \\
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \\
            --no-install-recommends {apt_build} && rm -rf /var/lib/apt/lists/*; \\
    fi
ADD {archive} /src/
RUN set -eu; \\
    cuda=""; \\
    if [ "$GGML_CUDA" = ON ]; then \\
        cuda="-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES -DGGML_CUDA_FA={fa}"; \\
        cuda="$cuda -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined"; \\
    fi; \\
    cmake -S /src/llama.cpp -B /build \\
        {cmake} \\
        "-DGGML_CUDA=$GGML_CUDA" $cuda; \\
    cmake --build /build --target llama-server -j "$(nproc)"; \\
    mkdir -p /out/bin /out/lib; \\
    cp /build/bin/llama-server /out/bin/; \\
    cp -P /build/bin/lib*.so* /out/lib/

FROM ${{RUNTIME_IMAGE}}
ARG APT_INSTALL={1 if site.apt else 0}
RUN if [ "$APT_INSTALL" = 1 ]; then \\
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \\
            --no-install-recommends curl ca-certificates libgomp1 && rm -rf /var/lib/apt/lists/*; \\
    fi; \\
    mkdir -p {LOCK_DIR} && chown {UID}:{UID} {LOCK_DIR}
COPY --from=build /out/ {PREFIX}/
COPY {ENTRYPOINT} /usr/local/bin/{ENTRYPOINT}
USER {UID}:{UID}
ENTRYPOINT ["/usr/local/bin/{ENTRYPOINT}"]
"""


_ENTRYPOINT = f"""\
#!/bin/sh
# llamavm's entrypoint (rendered by `invoke compose.render`): one big model at a time on this
# engine. Every big model's container shares the volume at {LOCK_DIR}; the first to lock it
# serves, and holds the lock for as long as llama-server runs (the descriptor passes to it).
# A second one started beside it says why and exits 0 (restart: on-failure leaves it stopped).
set -eu
if [ "${{LLAMAVM_EXCLUSIVE:-1}}" = 1 ]; then
    exec 9>>{LOCK_DIR}/gpu.lock
    if ! flock -n 9; then
        echo "llamavm: not starting ${{LLAMAVM_MODEL:-this model}}: another model's container" \\
            "holds this engine's GPU (the lock in {LOCK_DIR}) — swap models with:" \\
            "invoke switch --model ${{LLAMAVM_MODEL:-NAME}}" >&2
        exit 0
    fi
fi
exec {PREFIX}/bin/llama-server "$@"
"""


def _port(bind: str, port: int) -> str:
    host = f"[{bind}]" if ipaddress.ip_address(bind).version == 6 else bind
    return f"{host}:{port}:{port}"


def _service(cat: catalog_mod.Catalog, model: catalog_mod.Model, site: Site, image: str,
             args: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    command = contract.argv(
        cat, model, f"{PREFIX}/bin/llama-server", f"{MODELS}/{model.gguf}",
        bind="0.0.0.0", share=MODELS, key_file=KEY_FILE,
    )[1:]  # fmt: skip
    service: dict[str, Any] = {
        "image": image,
        "build": {"context": ".", "args": args},
        "container_name": f"{PROJECT}-{model.name}",
        "profiles": [model.name, "companions"] if model.companion else [model.name],
        "labels": {
            f"{LABEL}.model": model.name,
            f"{LABEL}.kind": "companion" if model.companion else "big",
        },
        "command": command,
        "environment": {
            "LLAMAVM_MODEL": model.name,
            "LLAMAVM_EXCLUSIVE": "0" if model.companion else "1",
        },
        "ports": [_port(site.bind_address, model.port)],
        "volumes": [
            {"type": "bind", "source": site.models_dir, "target": MODELS, "read_only": True},
            {"type": "volume", "source": LOCK_VOLUME, "target": LOCK_DIR},
        ],
        "user": f"{UID}:{UID}",
        "read_only": True,
        "tmpfs": ["/tmp"],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "restart": "on-failure",
        "stop_grace_period": "30s",
        "healthcheck": {
            "test": [
                "CMD",
                "curl",
                "-fsS",
                "-o",
                "/dev/null",
                f"http://127.0.0.1:{model.port}/health",
            ],
            "interval": "2s",
            "timeout": "2s",
            "retries": 3,
            "start_period": f"{model.health_timeout_s}s",
        },
    }
    if cat.settings.api_key.policy == "required":
        service["secrets"] = ["api_key"]
    if site.gpu and model.n_gpu_layers > 0:
        service["deploy"] = {
            "resources": {
                "reservations": {
                    "devices": [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
                }
            }
        }
    return service


class _Dumper(yaml.SafeDumper):
    """Every service spelled out: no YAML anchors for the build arguments they share."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@dataclass(frozen=True)
class Rendered:
    dir: Path
    image: str
    changed: list[str]


def render(cat: catalog_mod.Catalog, site: Site, out: Path | None = None,
           archive: Path | None = None) -> Rendered:  # fmt: skip
    """Write the project into `out` (default: the site's folder); unchanged files stay as they
    are. The API key (policy required) is made once, 0600, readable by the container's user."""
    from llamavm.artifacts import source

    out = out or site.dir
    archive = archive or source.prepare()
    label = source.load_config().label
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlamavmError(f"cannot create {out}: {exc.strerror} — pass --out DIR") from None
    dockerfile = _dockerfile(site, archive.name, label)
    backend = "cuda" if site.gpu else "cpu"
    digest = hashlib.sha256(
        "\0".join([str(RECIPE), dockerfile, _ENTRYPOINT, source.sha256_file(archive)]).encode()
    ).hexdigest()[:12]
    image = f"{IMAGE}:{label}-{backend}-{digest}"
    args = {"GGML_CUDA": "ON" if site.gpu else "OFF", "APT_INSTALL": "1" if site.apt else "0"}
    if site.gpu:
        args["CUDA_ARCHITECTURES"] = site.cuda_architectures
    doc: dict[str, Any] = {
        "x-llamavm": {
            "rendered-from": str(cat.path),
            "inventory": site.inventory,
            "source": label,
            "default-model": cat.default.name,
            "note": "rendered by `invoke compose.render`; render again after a catalog change",
        },
        "services": {m.name: _service(cat, m, site, image, args) for m in cat.models},
        "volumes": {LOCK_VOLUME: {}},
    }
    if cat.settings.api_key.policy == "required":
        doc["secrets"] = {"api_key": {"file": "./secrets/api-key"}}
    files = {
        "Dockerfile": dockerfile,
        ENTRYPOINT: _ENTRYPOINT,
        "compose.yaml": "# Rendered by `invoke compose.render` (llamavm/compose.py).\n"
        + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100),
        ".dockerignore": "secrets/\n.lock/\n.state.json\n",
    }
    try:
        changed = _write(out, files, archive)
        if cat.settings.api_key.policy == "required":
            changed += _key(out / "secrets" / "api-key")
    except OSError as exc:
        raise LlamavmError(
            f"cannot write the project into {out}: {exc.strerror} ({exc.filename}) — pass --out "
            "DIR, or set llamavm_compose_dir"
        ) from None
    return Rendered(out, image, changed)


def _write(out: Path, files: dict[str, str], archive: Path) -> list[str]:
    """Write what differs; the names written."""
    changed = []
    for name, text in files.items():
        path = out / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.chmod(0o755 if name == ENTRYPOINT else 0o644)
            tmp.replace(path)
            changed.append(name)
        elif name == ENTRYPOINT:
            path.chmod(0o755)
    shipped = out / archive.name
    if not shipped.is_file() or shipped.stat().st_size != archive.stat().st_size:
        shutil.copyfile(archive, shipped)
        changed.append(archive.name)
    for stale in out.glob("llama.cpp-*.tar.gz"):
        if stale.name != archive.name:
            stale.unlink()
    return changed


def _key(path: Path) -> list[str]:
    if path.is_file():
        return []
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    # The container reads it as its own user: a bind-mounted secret keeps the file's owner.
    if os.geteuid() == 0:
        os.chown(path, UID, UID)
        os.chown(path.parent, UID, UID)
    return ["secrets/api-key"]


# --- the engine ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Container:
    model: str
    kind: str
    status: str  # created, running, restarting, exited, ...
    health: str  # healthy, starting, unhealthy, "" (no healthcheck result yet)
    started_at: str
    exit_code: int
    image: str
    restarts: int = 0


class Engine:
    """The container engine's CLI for one project folder."""

    def __init__(self, site: Site, folder: Path | None = None) -> None:
        self.site = site
        self.dir = folder or site.dir
        self.env = {**os.environ}
        if site.engine_host:
            self.env["DOCKER_HOST"] = site.engine_host
            self.env["CONTAINER_HOST"] = site.engine_host
        cli = site.engine
        if cli == "auto":
            cli = "docker" if shutil.which("docker") else "podman"
        if not shutil.which(cli):
            raise LlamavmError(
                f"{site.inventory}: no {cli} CLI on this machine — install docker.io (or podman) "
                "and its compose, or set llamavm_compose_engine",
                code=2,
            )
        self.cli = cli
        self._compose: list[str] | None = None

    def compose_cli(self) -> list[str]:
        if self._compose is None:
            plugin = subprocess.run([self.cli, "compose", "version"], capture_output=True,
                                    env=self.env, check=False)  # fmt: skip
            if plugin.returncode == 0:
                self._compose = [self.cli, "compose"]
            elif shutil.which("docker-compose"):
                self._compose = ["docker-compose"]
            elif shutil.which("podman-compose"):
                self._compose = ["podman-compose"]
            else:
                raise LlamavmError(
                    f"{self.site.inventory}: no compose for {self.cli} here — install "
                    "docker-compose (Debian) or the compose plugin",
                    code=2,
                )
        return self._compose

    def run(self, args: list[str], *, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        # The project folder is the compose commands' directory; the engine's own commands
        # (ps, inspect, logs) run wherever, so a project not rendered yet is no error for them.
        cwd = self.dir if self.dir.is_dir() else None
        try:
            done = subprocess.run(args, capture_output=True, text=True, env=self.env,
                                  cwd=cwd, timeout=timeout, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise LlamavmError(f"{' '.join(args[:4])} took over {timeout:.0f} s") from None
        except OSError as exc:
            raise LlamavmError(f"cannot run {args[0]}: {exc.strerror}") from None
        if check and done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            raise LlamavmError(
                f"{' '.join(args[:3])} failed (exit {done.returncode}): "
                f"{said[-1] if said else 'no output'}",
                detail="\n".join(said[-15:-1]),
            )
        return done

    def compose(self, profiles: list[str], args: list[str], **kwargs: Any) -> Any:
        base = [*self.compose_cli(), "-p", PROJECT, "-f", str(self.dir / "compose.yaml")]
        for profile in profiles:
            base += ["--profile", profile]
        return self.run([*base, *args], **kwargs)

    def containers(self) -> dict[str, Container]:
        listed = self.run([self.cli, "ps", "-aq", "--filter", f"label={LABEL}.model"]).stdout
        ids = listed.split()
        if not ids:
            return {}
        found = self.run([self.cli, "inspect", *ids], check=False)
        out: dict[str, Container] = {}
        for item in json.loads(found.stdout or "[]"):
            labels = (item.get("Config") or {}).get("Labels") or {}
            state = item.get("State") or {}
            health = state.get("Health") or state.get("Healthcheck") or {}
            name = labels.get(f"{LABEL}.model", "")
            out[name] = Container(
                model=name,
                kind=labels.get(f"{LABEL}.kind", "big"),
                status=str(state.get("Status", "")),
                health=str(health.get("Status", "")),
                started_at=str(state.get("StartedAt", "")),
                exit_code=int(state.get("ExitCode", 0) or 0),
                image=str(item.get("Image", "")),
                restarts=int(item.get("RestartCount", 0) or 0),
            )
        return out

    def image_id(self, image: str) -> str | None:
        """The image's ID; None when the engine has no such image (an engine that does not
        answer is an error, not a missing image)."""
        done = self.run([self.cli, "image", "inspect", "--format", "{{.Id}}", image], check=False)
        if done.returncode == 0:
            return done.stdout.strip() or None
        said = (done.stderr or done.stdout).strip()
        if re.search(r"no such image|image not known|not found", said, re.IGNORECASE):
            return None
        lines = said.splitlines()
        raise LlamavmError(
            f"{self.cli} does not answer ({lines[-1] if lines else f'exit {done.returncode}'}) — "
            "start the engine, or check llamavm_compose_engine_host"
        )

    def logs(self, model: str, lines: int = 20) -> str:
        done = self.run([self.cli, "logs", "--tail", str(lines), f"{PROJECT}-{model}"],
                        check=False)  # fmt: skip
        return (done.stdout + done.stderr).strip()


# --- the transaction ----------------------------------------------------------------------------


def _project(folder: Path) -> dict[str, Any]:
    path = folder / "compose.yaml"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlamavmError(
            f"{path}: no compose project here — run invoke provision (or compose.render) first",
            code=2,
        ) from None
    return doc if isinstance(doc, dict) else {}


@contextlib.contextmanager
def _lock(folder: Path, timeout: float) -> Iterator[None]:
    """One switch at a time on this project: the host package's own switch lock (an flock on
    a root-only file), in the project folder."""
    try:
        with store.locked(folder / ".lock" / "switch.lock", timeout):
            yield
    except HostError as exc:
        if exc.code != EXIT_LOCK:
            raise LlamavmError(str(exc)) from None
        raise LlamavmError(
            f"another switch of {folder} held its lock for over {timeout:.0f} s — wait for it, "
            "or see invoke status",
            code=EXIT_LOCK,
        ) from None


def _state(folder: Path) -> dict[str, Any]:
    try:
        data = store.read_json(folder / ".state.json")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_state(folder: Path, **values: Any) -> None:
    store.write_json(folder / ".state.json", {**_state(folder), **values})


def _health(site: Site, port: int, timeout: float = 1.0) -> int | None:
    url = f"http://{site.probe_host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def _gate(engine: Engine, model: catalog_mod.Model) -> str | None:
    """Wait until `model` answers /health with 200 (None) or its container gives up (why)."""
    deadline = time.monotonic() + model.health_timeout_s
    restarts = None
    while time.monotonic() < deadline:
        found = engine.containers().get(model.name)
        if found is None:
            return "its container is gone"
        # A restart count from before this start (kept by some engines) is not this start's.
        restarts = found.restarts if restarts is None else restarts
        if found.status in ("exited", "dead"):
            return f"its container exited (status {found.exit_code})"
        if found.restarts > restarts:
            return f"llama-server exited (status {found.exit_code}) and its container restarts"
        if found.health == "unhealthy":
            return "its container's healthcheck says unhealthy"
        if found.status == "running" and (
            found.health == "healthy" or _health(engine.site, model.port) == 200
        ):
            return None
        time.sleep(0.25)
    return f"no healthy /health within {model.health_timeout_s} s"


def _running(found: dict[str, Container]) -> list[str]:
    return sorted(n for n, c in found.items() if c.kind == "big" and c.status in
                  ("running", "restarting"))  # fmt: skip


def _checks(cat: catalog_mod.Catalog, engine: Engine, model: catalog_mod.Model) -> str:
    """Refuse what cannot work before anything is stopped; the image the project uses."""
    if model.companion:
        raise LlamavmError(
            f"{model.name} is a companion (it runs beside a big model): start it with "
            f"{' '.join(engine.compose_cli())} -p {PROJECT} --profile {model.name} up -d",
            code=2,
        )
    doc = _project(engine.dir)
    service = (doc.get("services") or {}).get(model.name)
    if not isinstance(service, dict):
        raise LlamavmError(
            f"{engine.dir / 'compose.yaml'}: no service {model.name!r} — the project is older "
            "than the catalog: run invoke provision (or compose.render) again",
            code=2,
        )
    if not engine.site.engine_host:
        gguf = Path(engine.site.models_dir) / model.gguf
        if not gguf.is_file():
            raise LlamavmError(
                f"{model.name}: {gguf} is not there — put the GGUF in llamavm_compose_models_dir "
                f"({engine.site.models_dir}) or fix the catalog's gguf",
                code=2,
            )
    image = str(service.get("image", ""))
    if engine.image_id(image) is None:
        raise LlamavmError(
            f"{model.name}: the image {image} is not built on this engine — run invoke provision "
            f"-i {engine.site.inventory} (it builds it)",
            code=2,
        )
    return image


def _start(engine: Engine, model: catalog_mod.Model) -> None:
    engine.compose([model.name], ["up", "-d", "--no-deps", "--no-build", model.name])


def _stop(engine: Engine, names: list[str]) -> None:
    if names:
        engine.compose(names, ["stop", *names])


def switch(cat: catalog_mod.Catalog, engine: Engine, name: str, *, lock_timeout: float = 900,
           say: Callable[[str], None] = lambda _: None,
           restart: bool = False) -> dict[str, Any]:  # fmt: skip
    """Serve `name`: checks, stop the old, start the new, health gate, roll back on failure.
    `restart`: even when it serves already (a new image: its container is made again)."""
    began = time.monotonic()
    model = cat.resolve(name)
    _checks(cat, engine, model)
    with _lock(engine.dir, lock_timeout):
        found = engine.containers()
        running = _running(found)
        if running == [model.name] and not restart and _gate_now(engine, model):
            _save_state(engine.dir, active=model.name, stopped_by_operator=False)
            return {"ok": True, "changed": False, "active": model.name, "stopped": []}
        old = [n for n in running if n != model.name]
        say(f"llamavm: stopping {', '.join(old) or 'nothing'}, starting {model.name}")
        stopped_at = time.monotonic()
        _stop(engine, running)
        loading = time.monotonic()
        try:
            _start(engine, model)
            why = _gate(engine, model)
        except LlamavmError as exc:  # the engine refused or went away half-way
            why = f"it did not start ({exc})"
        if why is not None:
            journal = engine.logs(model.name)
            with contextlib.suppress(LlamavmError):
                _stop(engine, [model.name])
            back = _rollback(cat, engine, old)
            raise LlamavmError(
                f"{model.name} did not become healthy: {why}; {back}", code=1, detail=journal
            )
        loaded = time.monotonic()
        now = _running(engine.containers())
        if now != [model.name]:
            _stop(engine, [n for n in now if n != model.name])
        _save_state(engine.dir, active=model.name, stopped_by_operator=False,
                    last_load_s=round(loaded - loading, 2))  # fmt: skip
        return {
            "ok": True,
            "changed": True,
            "active": model.name,
            "stopped": old,
            "load_seconds": loaded - loading,
            "downtime_seconds": loaded - stopped_at,
            "switch_seconds": time.monotonic() - began,
        }


def _gate_now(engine: Engine, model: catalog_mod.Model) -> bool:
    found = engine.containers().get(model.name)
    return bool(found and found.status == "running" and
                (found.health == "healthy" or _health(engine.site, model.port) == 200))  # fmt: skip


def _rollback(cat: catalog_mod.Catalog, engine: Engine, old: list[str]) -> str:
    if not old:
        return "nothing served before, nothing serves now"
    previous = cat.resolve(old[0])
    try:
        _start(engine, previous)
        why = _gate(engine, previous)
    except LlamavmError as exc:
        why = str(exc)
    if why is None:
        _save_state(engine.dir, active=previous.name, stopped_by_operator=False)
        return f"rolled back: {previous.name} serves again"
    return f"the roll back to {previous.name} failed too: {why}"


def stop(engine: Engine, *, lock_timeout: float = 900) -> dict[str, Any]:
    """Stop every model's container of the project (the operator asked: nothing serves)."""
    with _lock(engine.dir, lock_timeout):
        found = engine.containers()
        up = sorted(n for n, c in found.items() if c.status in ("running", "restarting"))
        _stop(engine, up)
        _save_state(engine.dir, stopped_by_operator=True)
        return {"ok": True, "stopped": up}


def status(cat: catalog_mod.Catalog, engine: Engine) -> dict[str, Any]:
    """The host's answer in the shape `invoke status` shows for a systemd host."""
    found = engine.containers()
    running = _running(found)
    state = _state(engine.dir)
    models = []
    for model in cat.models:
        box = found.get(model.name)
        up = box is not None and box.status == "running"
        models.append({
            "name": model.name,
            "port": model.port,
            "container": f"{PROJECT}-{model.name}",
            "file": f"{engine.site.models_dir}/{model.gguf}",
            "load": "container",
            "state": box.status if box else "absent",
            "health": _health(engine.site, model.port) if up else None,
            "uptime_s": _uptime(box.started_at) if up and box else None,
            "loads": [state["last_load_s"]] if model.name == state.get("active") and
            state.get("last_load_s") else [],
            "companion": model.companion,
        })  # fmt: skip
    return {
        "ok": True,
        "kind": "compose",
        "project": str(engine.dir),
        "running": running,
        "models": [m for m in models if not m["companion"]],
        "companions": [
            {
                "name": m["name"],
                "port": m["port"],
                "state": "active" if m["state"] == "running" else "inactive",
                "health": m["health"],
                "task": cat.resolve(m["name"]).task,
                "admitted": True,
            }
            for m in models
            if m["companion"] and m["state"] != "absent"
        ],
        "stopped_by_operator": bool(state.get("stopped_by_operator")),
        "gpu": [],
    }


def _uptime(started_at: str) -> float | None:
    from datetime import datetime

    try:
        began = datetime.fromisoformat(started_at[:26].rstrip("Z") + "+00:00")
    except ValueError:
        return None
    return max(0.0, time.time() - began.timestamp())


def build(engine: Engine, cat: catalog_mod.Catalog, image: str,
          say: Callable[[str], None] = print) -> bool:  # fmt: skip
    """Build the project's image (once: every service shares it); True if it is new."""
    before = engine.image_id(image)
    if before is not None:
        return False
    say(f"llamavm: building {image} (llama.cpp from source: minutes)")
    engine.compose([cat.default.name], ["build", cat.default.name], timeout=7200)
    if engine.image_id(image) is None:
        raise LlamavmError(f"the build finished but {image} is not on the engine")
    return True


def provision(cat: catalog_mod.Catalog, engine: Engine, default: str | None = None,
              say: Callable[[str], None] = print) -> list[str]:  # fmt: skip
    """Converge the project: render it, build its image, serve the default model when nothing
    serves (or the serving one from an older image). What changed, in words; [] for nothing."""
    rendered = render(cat, engine.site, engine.dir)
    done = [f"rendered {', '.join(rendered.changed)}"] if rendered.changed else []
    if build(engine, cat, rendered.image, say=say):
        done.append(f"built {rendered.image}")
    found = engine.containers()
    running = _running(found)
    state = _state(engine.dir)
    if running and found[running[0]].image != engine.image_id(rendered.image):
        # The serving model runs an older image: the same model again, from the new one.
        answer = switch(cat, engine, running[0], say=say, restart=True)
        done.append(f"restarted {answer['active']} on the new image")
    elif not running and not state.get("stopped_by_operator"):
        answer = switch(cat, engine, default or cat.default.name, say=say)
        done.append(f"started {answer['active']}")
    elif not running:
        say("llamavm: no model serves (stopped by invoke stop): left stopped")
    return done


def detached_switch(inventory: Path, catalog_path: Path, name: str, *,
                    lock_timeout: float) -> dict[str, Any]:  # fmt: skip
    """`switch` in a process of its own session, as a systemd host's transaction runs detached
    on the host: an interrupted or killed CLI leaves it to complete or roll back by itself."""
    import sys

    cmd = [sys.executable, "-m", "llamavm.compose", "switch", str(inventory), str(catalog_path),
           name, str(lock_timeout)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate()
    except KeyboardInterrupt:
        raise LlamavmError(
            f"interrupted here — the switch to {name} goes on and completes or rolls back by "
            f"itself; invoke status -i {inventory.name} shows how it ended",
            code=130,
        ) from None
    lines = out.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if not isinstance(answer, dict) or "ok" not in answer:
        said = (err or out).strip().splitlines()
        raise LlamavmError(
            f"the switch's process ended with status {proc.returncode}: "
            f"{said[-1] if said else 'no output'}",
            detail="\n".join(said[-15:-1]),
        )
    if not answer["ok"]:
        raise LlamavmError(
            answer.get("error", "failed"),
            code=answer.get("code", 1),
            detail=answer.get("detail", ""),
        )
    return answer


def _main(argv: list[str]) -> int:
    """`python -m llamavm.compose switch INVENTORY CATALOG MODEL LOCK_TIMEOUT`: the detached
    transaction; its answer is the last line of stdout (JSON)."""
    from llamavm.inputs import inventory as inventory_mod
    from llamavm.ops import remote

    if len(argv) != 5 or argv[0] != "switch":
        print("usage: python -m llamavm.compose switch INVENTORY CATALOG MODEL LOCK_TIMEOUT")
        return 2
    _, inventory, catalog_path, name, timeout = argv
    try:
        inv = inventory_mod.resolve(inventory)
        cat = catalog_mod.load(catalog_path)
        hosts = remote.hosts(inv.path)
        engine = Engine(site(inv, cat, hosts[0].address if hosts else None))
        answer = switch(cat, engine, name, lock_timeout=float(timeout))
    except LlamavmError as exc:
        answer = {"ok": False, "error": str(exc), "code": exc.exit_code, "detail": exc.detail}
    print(json.dumps(answer), flush=True)
    return 0 if answer["ok"] else int(answer["code"])


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
