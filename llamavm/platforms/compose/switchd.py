"""The project's `switchd` service: the host package's transaction, run in the Compose project.

The same host contract a systemd host gets (llamavm/artifacts/contract.py), with the Compose
runtime in it: a model's unit is its container (`llamavm-<name>`), reached by that name on the
project's network; the models are read at /models; state, outcomes and the pending
transaction live on the project's `state` volume. Its image is the model image with Python
(the host package is standard library only), the host package as `llamavm-switch` and the
contract; it runs `llamavm-switch switchd` as root with every capability dropped but reading
files it does not own (the key, the models), the engine's socket mounted, no port published.
No other container of the project gets the socket: the boundary to the engine is this one
container, which starts and stops the project's model containers and nothing else.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from llamavm.artifacts import contract
from llamavm.inputs import catalog as catalog_mod
from llamavm.inputs import vram
from llamavm.platforms.compose import frontdoor
from llamavm.platforms.compose.names import LABEL, MODELS, PROJECT, UID, published
from llamavm.platforms.compose.site import Site

SERVICE = "switchd"
CONTAINER = f"{PROJECT}-{SERVICE}"
IMAGE = "llamavm/switchd"
DOCKERFILE = "Dockerfile.switchd"
#: The host package in the project folder (copied into the image).
PACKAGE = contract.SWITCH_NAME
CONTRACT = "contract.json"
#: Where the engine's socket is inside the switchd container.
SOCKET = "/var/run/docker.sock"
#: The volume of the host package's state (the contract's state_dir).
STATE_VOLUME = "state"
#: How long a stopped model container gets before SIGKILL (its stop_grace_period).
GRACE_S = 30
#: `MODEL=qwen docker compose up -d` reaches switchd as this variable.
MODEL_ENV = "LLAMAVM_MODEL"
#: The control service: its container, and the volume only it and switchd mount, where
#: switchd's helper socket is (root:UID, 0660 — the control service runs as UID).
CONTROL = "control"
CONTROL_CONTAINER = f"{PROJECT}-{CONTROL}"
HELPER_VOLUME = "helper"
HELPER_DIR = "/run/llamavm-helper"
#: The metrics service (node_exporter) and the volume of llamavm's series, which switchd
#: writes (its textfile collector's folder).
METRICS = "metrics"
METRICS_CONTAINER = f"{PROJECT}-{METRICS}"
METRICS_VOLUME = "metrics"
METRICS_DIR = "/srv/llamavm/metrics"
#: The project's key file, and where switchd sees it (read and write: it rotates it).
KEY_SOURCE = "./secrets/api-key"
SWITCHD_KEY = "/srv/llamavm/secrets/api-key"
#: Where the control service finds the key (its CREDENTIALS_DIRECTORY, as systemd's
#: LoadCredential gives it on a host).
CREDENTIALS = "/run/secrets"


def container(model: catalog_mod.Model) -> str:
    return f"{PROJECT}-{model.name}"


def host_contract(cat: catalog_mod.Catalog) -> dict[str, Any]:
    """The host contract of the project: a systemd host's, on the Compose runtime."""
    cfg = contract.load_host_config()
    # Each model's VRAM estimate, as a host's contract has it: the admission of companions
    # beside each big model comes from them.
    estimates = {m.name: vram.estimate(cat, m).as_dict() for m in cat.models}
    vram.check_companions(cat, {n: e["total_mib"] for n, e in estimates.items()})
    doc = copy.deepcopy(contract.build(cat, estimates, cfg))
    models = {m.name: m for m in cat.models}
    for entry in (*doc["models"], *doc["companions"]):
        model = models[entry["name"]]
        name = container(model)
        base_url = f"http://{name}:{model.port}"
        entry.update(
            unit=name,
            base_url=base_url,
            health_url=f"{base_url}/health",
            gguf=f"{MODELS}/{model.gguf}",
            source=f"{MODELS}/{model.gguf}",
            load="share",
        )
        for systemd_only in ("argv", "systemd"):
            entry.pop(systemd_only, None)
    doc["share_path"] = MODELS
    # switchd's own view of the project's key file, writable: a rotation rewrites it in place
    # (every container mounts it by path), the servers restarted with it.
    doc["api_key"].update(file=SWITCHD_KEY, in_place=True)
    for feature in ("firewall", "front_door"):
        doc[feature]["enabled"] = False
    # switchd writes llamavm's series where the metrics service's node_exporter reads them.
    doc["metrics"].update(textfile=f"{METRICS_DIR}/llamavm.prom", unit=METRICS_CONTAINER)
    # The control service listens on every address of its container (published on the
    # inventory's bind address) and asks switchd through the helper volume.
    # With the front door, its upstream is the control service's wake listener, on the
    # project's network (not published).
    front = frontdoor.enabled(cat)
    doc["control"].update(bind_address="0.0.0.0", helper_socket=f"{HELPER_DIR}/switchd.sock",
                          wake_port=cfg.wake_port if front else None,
                          wake_bind=frontdoor.WAKE_BIND, unit=CONTROL_CONTAINER)  # fmt: skip
    doc["runtime"] = {"kind": "compose", "socket": SOCKET, "label": f"{LABEL}.model",
                      "grace_s": GRACE_S}  # fmt: skip
    return doc


def contract_text(cat: catalog_mod.Catalog) -> str:
    return json.dumps(host_contract(cat), indent=2, sort_keys=True) + "\n"


def dockerfile(site: Site, control: bool, front_door: bool = False,
               metrics: bool = False) -> str:  # fmt: skip
    """switchd's image; with the control service, Python's web stack (Debian's and Ubuntu's
    packages, as the control role installs them on a host) too; with the front door, Caddy
    and its Caddyfile; with the metrics, node_exporter."""
    user = f"llama:x:{UID}:{UID}:llamavm:/nonexistent:/usr/sbin/nologin"
    need = "python3-minimal" + (" python3-fastapi python3-uvicorn python3-httpx" if control else "")
    probe = "import fastapi, uvicorn, httpx" if control else "import json"
    if front_door:
        need += " caddy"
        probe += '; import shutil; assert shutil.which("caddy")'
    if metrics:
        need += " prometheus-node-exporter"
        probe += '; import shutil; assert shutil.which("prometheus-node-exporter")'
    caddy = (
        f"RUN mkdir -p {frontdoor.DATA_DIR} && chown {UID}:{UID} {frontdoor.DATA_DIR}\n"
        f"COPY {frontdoor.CADDYFILE} {frontdoor.CONFIG}\n"
        if front_door
        else ""
    )
    return f"""\
# Rendered by `invoke compose.render` — render again, don't edit.
# llamavm-switchd: the model image, with Python, the host package and the host contract.
ARG MODEL_IMAGE
FROM ${{MODEL_IMAGE}}
ARG APT_INSTALL={1 if site.apt else 0}
USER root
RUN set -eu; \\
    if ! python3 -c '{probe}' 2>/dev/null; then \\
        if [ "$APT_INSTALL" != 1 ]; then \\
            echo "llamavm: the runtime image lacks {need} — use one that has them, or set" \\
                "llamavm_compose_apt: true" >&2; \\
            exit 1; \\
        fi; \\
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \\
            --no-install-recommends {need} && rm -rf /var/lib/apt/lists/*; \\
    fi; \\
    grep -q '^llama:' /etc/passwd || echo '{user}' >> /etc/passwd; \\
    grep -q '^llama:' /etc/group || echo 'llama:x:{UID}:' >> /etc/group
COPY {PACKAGE} /usr/local/bin/{PACKAGE}
COPY {CONTRACT} /etc/llamavm/contract.json
{caddy}ENTRYPOINT ["/usr/local/bin/{PACKAGE}"]
CMD ["switchd"]
"""


def image(dockerfile_text: str, package: bytes, contract: str, model_image: str,
          caddyfile: str = "") -> str:  # fmt: skip
    """The switchd image's tag: what goes into it decides it."""
    digest = hashlib.sha256()
    parts = (dockerfile_text.encode(), package, contract.encode(), model_image.encode(),
             caddyfile.encode())  # fmt: skip
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)
    return f"{IMAGE}:{digest.hexdigest()[:12]}"


def service(cat: catalog_mod.Catalog, site: Site, switchd_image: str,
            model_image: str) -> dict[str, Any]:  # fmt: skip
    """The switchd service of compose.yaml (no profile: `docker compose up -d` starts it)."""
    svc: dict[str, Any] = {
        "image": switchd_image,
        "build": {
            "context": ".",
            "dockerfile": DOCKERFILE,
            "args": {"MODEL_IMAGE": model_image, "APT_INSTALL": "1" if site.apt else "0"},
        },
        "container_name": CONTAINER,
        "labels": {f"{LABEL}.kind": SERVICE},
        "init": True,
        "environment": {MODEL_ENV: "${MODEL:-}"},
        # The control service's helper socket is made for this group (the control service's).
        "group_add": [str(UID)],
        "volumes": [
            {"type": "bind", "source": site.engine_socket, "target": SOCKET},
            {"type": "volume", "source": HELPER_VOLUME, "target": HELPER_DIR},
            *(
                [{"type": "volume", "source": METRICS_VOLUME, "target": METRICS_DIR}]
                if cat.settings.expose.metrics
                else []
            ),
            {"type": "bind", "source": site.models_dir, "target": MODELS, "read_only": True},
            {
                "type": "volume",
                "source": STATE_VOLUME,
                "target": contract.load_host_config().state_dir,
            },
        ],
        "read_only": True,
        "tmpfs": [contract.load_host_config().run_dir, "/tmp"],
        "cap_drop": ["ALL"],
        "cap_add": ["DAC_OVERRIDE"],
        "security_opt": ["no-new-privileges:true"],
        "restart": "unless-stopped",
        # A transaction under way when it is told to stop is left to the next switchd.
        "stop_grace_period": "20s",
    }
    if cat.settings.api_key.policy == "required":
        svc["volumes"].append({"type": "bind", "source": KEY_SOURCE, "target": SWITCHD_KEY})
    if site.gpu:  # nvidia-smi (GPU memory for status and the stop's wait), no compute
        devices = [{"driver": "nvidia", "count": "all", "capabilities": ["utility"]}]
        svc["deploy"] = {"resources": {"reservations": {"devices": devices}}}
    return svc


def control_service(cat: catalog_mod.Catalog, site: Site, switchd_image: str) -> dict[str, Any]:
    """The control service (REST API, SSE, picker page, /v1 routing) from switchd's image, as
    the server's unprivileged user: no engine socket, the key as its credential, its port on
    the bind address; it changes what serves only by asking switchd (the helper socket)."""
    port = cat.settings.control.port
    svc: dict[str, Any] = {
        "image": switchd_image,
        "container_name": CONTROL_CONTAINER,
        "command": ["control"],
        "user": f"{UID}:{UID}",
        "labels": {f"{LABEL}.kind": CONTROL},
        "init": True,
        "depends_on": [SERVICE],
        "ports": [published(site.bind_address, port)],
        "volumes": [
            {"type": "volume", "source": HELPER_VOLUME, "target": HELPER_DIR},
            # switchd's state, read only: its file's stamp says a switch happened elsewhere.
            {
                "type": "volume",
                "source": STATE_VOLUME,
                "target": contract.load_host_config().state_dir,
                "read_only": True,
            },
        ],
        "read_only": True,
        "tmpfs": ["/tmp"],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "restart": "unless-stopped",
    }
    if cat.settings.api_key.policy == "required":
        svc["environment"] = {"CREDENTIALS_DIRECTORY": CREDENTIALS}
        svc["secrets"] = [{"source": "api_key", "target": "api-key"}]
    return svc


def metrics_service(cat: catalog_mod.Catalog, site: Site, switchd_image: str) -> dict[str, Any]:
    """node_exporter (from switchd's image) on `reserved_ports.node_exporter` of the bind
    address, with llamavm's series from the metrics volume (switchd writes them, GPU ones from
    nvidia-smi where there is a GPU): the servers' user, read-only, no capability, no socket.
    What it reports of the machine is the container's view (the box's CPU and memory)."""
    port = cat.settings.reserved_ports["node_exporter"]
    return {
        "image": switchd_image,
        "container_name": METRICS_CONTAINER,
        "entrypoint": ["prometheus-node-exporter"],
        "command": [
            f"--web.listen-address=:{port}",
            f"--collector.textfile.directory={METRICS_DIR}",
        ],
        "user": f"{UID}:{UID}",
        "labels": {f"{LABEL}.kind": METRICS},
        "init": True,
        "ports": [published(site.bind_address, port)],
        "volumes": [
            {"type": "volume", "source": METRICS_VOLUME, "target": METRICS_DIR, "read_only": True}
        ],
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "restart": "unless-stopped",
    }
