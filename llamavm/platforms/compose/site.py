"""A Compose host's settings: an inventory's `llamavm_compose_*`, with their defaults, checked
— each bad value is refused in one line naming its file."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamavm import paths
from llamavm.errors import LlamavmError
from llamavm.inputs import catalog as catalog_mod
from llamavm.inputs.inventory import Inventory

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
    #: The engine's socket on its machine: the one container that may reach it (switchd)
    #: mounts it.
    engine_socket: str = "/var/run/docker.sock"


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
    default_socket = "/var/run/docker.sock"
    if engine_host.startswith("unix://"):
        default_socket = engine_host.removeprefix("unix://")
    engine_socket = _setting(inv, "llamavm_compose_engine_socket", str, default_socket,
                             "the engine's socket on its machine: an absolute path")  # fmt: skip
    if not engine_socket.startswith("/") or ":" in engine_socket:
        where = inv.sources.get("llamavm_compose_engine_socket", inv.path)
        raise LlamavmError(
            f"{where}: llamavm_compose_engine_socket: {engine_socket!r} — the engine's socket on "
            "its machine, an absolute path like /var/run/docker.sock",
            code=2,
        )
    probe = host_address or "127.0.0.1"
    if not address.is_unspecified:
        probe = bind
    return Site(
        inventory=name, dir=Path(folder), engine=engine, engine_host=engine_host,
        models_dir=models_dir, gpu=gpu, cuda_architectures=archs, build_image=build_image,
        runtime_image=runtime_image, apt=apt, bind_address=bind, probe_host=probe,
        engine_socket=engine_socket,
    )  # fmt: skip
