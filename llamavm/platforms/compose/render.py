"""The project folder a Compose host runs, written from the validated catalog and a site (what
`invoke compose.render` writes, and `invoke provision` of a compose inventory): a Dockerfile
(llama.cpp from the same pinned source archive and the same cmake flags as the llama_cpp role —
a portable build, CUDA when the host has a GPU), an entrypoint, the source archive, and a
`compose.yaml` with one service per model, each in a profile of its own: the GGUF folder
mounted read-only, the GPU requested the Compose way (`deploy.resources.reservations.devices`,
driver nvidia) unless the host is CPU-only, the port on the bind address, the API key as a
secret file, a healthcheck on /health, an unprivileged read-only container.

One big model at a time is enforced twice: the switch holds a lock and stops the old container
before it starts the new one (switch.py), and every big model's entrypoint takes an exclusive
lock on a volume all of them share — a container started by hand beside a serving one says why
and exits (status 0, so `restart: on-failure` does not loop it) instead of loading a second
model. Rendering reads files only; it asks no engine.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llamavm import REPO_ROOT
from llamavm.artifacts import contract
from llamavm.errors import LlamavmError
from llamavm.inputs import catalog as catalog_mod
from llamavm.platforms.compose import frontdoor, switchd
from llamavm.platforms.compose.names import KEY_FILE, LABEL, MODELS, PROJECT, UID, published
from llamavm.platforms.compose.site import Site

__all__ = ["KEY_FILE", "LABEL", "MODELS", "PROJECT", "UID", "Rendered", "render"]

#: The image's repository.
IMAGE = "llamavm/llama-server"
#: Where the image puts llama.cpp.
PREFIX = "/opt/llama.cpp"
#: The volume every big model's container shares, and the lock its entrypoint takes there.
LOCK_VOLUME = "gpu-lock"
#: The volume of the saved slots (a folder per model, made by its entrypoint, 0700).
SLOT_VOLUME = "slots"
LOCK_DIR = "/run/llamavm-lock"
ENTRYPOINT = "llamavm-entrypoint"
ROLE_DEFAULTS = REPO_ROOT / "ansible" / "roles" / "llama_cpp" / "defaults" / "main.yml"
ROLE_PREFLIGHT = REPO_ROOT / "ansible" / "roles" / "llama_cpp" / "tasks" / "preflight.yml"
#: Renders and builds are keyed by this: a change here re-renders every project.
RECIPE = 1
#: The maker the Dockerfile's and compose.yaml's first comment name: the module this one was
#: before issue 35 made a package of it. The Dockerfile's text keys the image's tag, so naming
#: this file instead would rebuild every project's image; change it with RECIPE.
MAKER = "llamavm/compose.py"


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
# Rendered by `invoke compose.render` ({MAKER}) — render again, don't edit.
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
    mkdir -p {LOCK_DIR} {_slot_root()} && chown {UID}:{UID} {LOCK_DIR} {_slot_root()} && \\
    chmod 0700 {_slot_root()}
COPY --from=build /out/ {PREFIX}/
COPY {ENTRYPOINT} /usr/local/bin/{ENTRYPOINT}
USER {UID}:{UID}
ENTRYPOINT ["/usr/local/bin/{ENTRYPOINT}"]
"""


#: The entrypoint: the file ENTRYPOINT of the project, and of the image.
ENTRYPOINT_SCRIPT = f"""\
#!/bin/sh
# llamavm's entrypoint (rendered by `invoke compose.render`): one big model at a time on this
# engine. Every big model's container shares the volume at {LOCK_DIR}; the first to lock it
# serves, and holds the lock for as long as llama-server runs (the descriptor passes to it).
# A second one started beside it says why and exits 0 (restart: on-failure leaves it stopped).
set -eu
if [ -n "${{LLAMAVM_SLOT_DIR:-}}" ]; then
    mkdir -p -m 0700 "$LLAMAVM_SLOT_DIR"
fi
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


def _slot_root() -> str:
    return contract.load_host_config().slot_dir


def slot_dir_of(model: catalog_mod.Model) -> str | None:
    """Where a big model's server saves its slots (prompt caches kept across a switch): its
    folder on the project's slots volume, as on a systemd host (None: not kept)."""
    if not model.prompt_cache or model.companion:
        return None
    return f"{_slot_root()}/{model.name}"


def _service(cat: catalog_mod.Catalog, model: catalog_mod.Model, site: Site, image: str,
             args: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    slot_dir = slot_dir_of(model)
    command = contract.argv(
        cat, model, f"{PREFIX}/bin/llama-server", f"{MODELS}/{model.gguf}", slot_dir,
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
            **({"LLAMAVM_SLOT_DIR": slot_dir} if slot_dir else {}),
        },
        "ports": [published(site.bind_address, model.port)],
        "volumes": [
            {"type": "bind", "source": site.models_dir, "target": MODELS, "read_only": True},
            {"type": "volume", "source": LOCK_VOLUME, "target": LOCK_DIR},
            *(
                [{"type": "volume", "source": SLOT_VOLUME, "target": _slot_root()}]
                if slot_dir
                else []
            ),
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
    #: The switchd service's image.
    switchd_image: str = ""


def render(cat: catalog_mod.Catalog, site: Site, out: Path | None = None,
           archive: Path | None = None) -> Rendered:  # fmt: skip
    """Write the project into `out` (default: the site's folder); unchanged files stay as they
    are. The API key (policy required) is made once, 0600, readable by the container's user."""
    from llamavm.artifacts import hostpkg, source

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
        "\0".join(
            [str(RECIPE), dockerfile, ENTRYPOINT_SCRIPT, source.sha256_file(archive)]
        ).encode()
    ).hexdigest()[:12]
    image = f"{IMAGE}:{label}-{backend}-{digest}"
    args = {"GGML_CUDA": "ON" if site.gpu else "OFF", "APT_INSTALL": "1" if site.apt else "0"}
    if site.gpu:
        args["CUDA_ARCHITECTURES"] = site.cuda_architectures
    package_key = hostpkg.source_key()
    contract_text = switchd.contract_text(cat)
    control = cat.settings.control.enabled
    front = frontdoor.enabled(cat)
    if cat.settings.expose.front_door.enabled and not control:
        raise LlamavmError(
            f"{cat.path}: settings.expose.front_door.enabled: true needs settings.control."
            "enabled: true on Compose (the front door sends requests through the control "
            "service) — turn the control service on, or the front door off",
            code=2,
        )
    caddyfile = frontdoor.caddyfile(cat) if front else ""
    metrics = cat.settings.expose.metrics
    switchd_file = switchd.dockerfile(site, control, front, metrics)
    switchd_image = switchd.image(
        switchd_file, package_key.encode(), contract_text, image, caddyfile
    )
    doc: dict[str, Any] = {
        "x-llamavm": {
            "rendered-from": str(cat.path),
            "inventory": site.inventory,
            "source": label,
            "default-model": cat.default.name,
            "note": "rendered by `invoke compose.render`; render again after a catalog change",
        },
        "services": {
            **{m.name: _service(cat, m, site, image, args) for m in cat.models},
            switchd.SERVICE: switchd.service(cat, site, switchd_image, image),
            **(
                {switchd.CONTROL: switchd.control_service(cat, site, switchd_image)}
                if control
                else {}
            ),
            **({frontdoor.SERVICE: frontdoor.service(cat, site, switchd_image)} if front else {}),
            **(
                {switchd.METRICS: switchd.metrics_service(cat, site, switchd_image)}
                if metrics
                else {}
            ),
        },
        "volumes": {
            LOCK_VOLUME: {},
            SLOT_VOLUME: {},
            switchd.STATE_VOLUME: {},
            switchd.HELPER_VOLUME: {},
            **({frontdoor.DATA_VOLUME: {}} if front else {}),
            **({switchd.METRICS_VOLUME: {}} if metrics else {}),
        },
    }
    if cat.settings.api_key.policy == "required":
        doc["secrets"] = {"api_key": {"file": "./secrets/api-key"}}
    files = {
        "Dockerfile": dockerfile,
        ENTRYPOINT: ENTRYPOINT_SCRIPT,
        "compose.yaml": f"# Rendered by `invoke compose.render` ({MAKER}).\n"
        + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100),
        ".dockerignore": "secrets/\n.lock/\n.state.json\n",
        # `docker compose` in this folder (MODEL=qwen docker compose up -d) is this project.
        ".env": f"COMPOSE_PROJECT_NAME={PROJECT}\n",
        switchd.DOCKERFILE: switchd_file,
        switchd.CONTRACT: contract_text,
        **({frontdoor.CADDYFILE: caddyfile} if front else {}),
    }
    try:
        changed = _write(out, files, archive)
        changed += _package(out, package_key, hostpkg.archive_bytes)
        if cat.settings.api_key.policy == "required":
            changed += _key(out / "secrets" / "api-key")
    except OSError as exc:
        raise LlamavmError(
            f"cannot write the project into {out}: {exc.strerror} ({exc.filename}) — pass --out "
            "DIR, or set llamavm_compose_dir"
        ) from None
    return Rendered(out, image, changed, switchd_image)


def _package(out: Path, key: str, make: Any) -> list[str]:
    """The host package for switchd's image, written when its sources changed (its bytes are
    not stable from one process to the next; its sources' key is)."""
    path, stamp = out / switchd.PACKAGE, out / f".{switchd.PACKAGE}.key"
    if path.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == key:
        return []
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(make())
    tmp.chmod(0o755)
    tmp.replace(path)
    stamp.write_text(key, encoding="utf-8")
    return [switchd.PACKAGE]


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
