"""The project's front door: Caddy, one URL for the LAN that always reaches the serving model.

On a host the front door's upstream is a loopback port the firewall's map sends to the serving
model. A Compose project has no such map, and its model containers cannot be upstreams: a
stopped container's name leaves the project's network, and a lookup of it can take seconds to
fail. So every request goes to the control service's wake listener (`control:<wake_port>`, on
the project's network only), which sends it to whichever model serves, waits through a switch
from anywhere, wakes a sleeping model, and sends a companion's paths to the companion. Caddy
keeps what it does on the host: the port on the bind address, TLS from its internal CA when
the catalog asks, the body limit, a body read whole before it goes on (see the host's
Caddyfile, ansible/roles/expose/templates/etc/caddy/Caddyfile.j2), streams passed at once.
It runs from switchd's image, as the servers' user, with no engine socket and no capability.
"""

from __future__ import annotations

from typing import Any

from llamavm.artifacts import contract
from llamavm.inputs import catalog as catalog_mod
from llamavm.platforms.compose.names import LABEL, PROJECT, UID, published
from llamavm.platforms.compose.site import Site

SERVICE = "front-door"
CONTAINER = f"{PROJECT}-{SERVICE}"
CADDYFILE = "Caddyfile"
#: Where the image has it.
CONFIG = "/etc/caddy/Caddyfile"
#: Caddy's data (its internal CA, kept across restarts so clients keep trusting it).
DATA_VOLUME = "front-door-data"
DATA_DIR = "/srv/llamavm/front-door"
#: The wake listener's address inside the container (the project's network only).
WAKE_BIND = "0.0.0.0"
#: Kept connections to the control service let go well before uvicorn's own idle timeout.
KEEPALIVE_S = 30
#: How long a request waits for the control service itself (restarted with the project).
CONTROL_WAIT_S = 30
#: The request body limit (the host's expose_front_door_max_request_body_mib default).
MAX_BODY_MIB = 64


def enabled(cat: catalog_mod.Catalog) -> bool:
    return cat.settings.expose.front_door.enabled and cat.settings.control.enabled


def caddyfile(cat: catalog_mod.Catalog) -> str:
    front = cat.settings.expose.front_door
    port = cat.settings.reserved_ports["proxy"]
    upstream = f"control:{contract.load_host_config().wake_port}"
    max_body = MAX_BODY_MIB * 1048576
    site = f"https://:{port} {{\n\ttls internal" if front.tls else f"http://:{port} {{"
    tls = "skip_install_trust" if front.tls else "auto_https off"
    length = "{http.request.header.Content-Length}"
    down = "the control service does not answer (docker compose ps says why) — retry shortly"
    return f"""\
# Rendered by `invoke compose.render` — render again, don't edit.
# The llamavm front door on Compose: every request goes to the control service's wake listener
# ({upstream}), which sends it to whichever model serves, waiting through a switch (at most
# {front.wait_s} s) and waking a sleeping model; companions' paths go to the companion. The API
# key is checked there and by the model (Authorization passes through).
{{
\tadmin off
\t{tls}
}}

(proxying) {{
\t# The control service restarting: dial again for a while (nothing was sent).
\tlb_try_duration {CONTROL_WAIT_S}s
\tlb_try_interval 250ms
\t# Streams (server-sent events) pass at once, token by token.
\tflush_interval -1
\ttransport http {{
\t\tdial_timeout 2s
\t\tkeepalive {KEEPALIVE_S}s
\t\t# As long as a request may wait through a switch before the answer's head.
\t\tresponse_header_timeout {front.wait_s + 60}s
\t}}
}}

{site}
\trequest_body {{
\t\tmax_size {max_body}
\t}}
\t@too_big expression `{length} != "" && int({length}) > {max_body}`
\t# A request's body is read whole before it goes on (Caddy 2.6 otherwise may end a stream
\t# early when the answer starts before the body was read; see the host's Caddyfile).
\t@body {{
\t\tmethod POST PUT PATCH DELETE
\t\texpression `{{http.request.body}} != ""`
\t}}
\troute {{
\t\trespond @too_big "llamavm: the request body is over {MAX_BODY_MIB} MiB" 413
\t\treverse_proxy @body {upstream} {{
\t\t\timport proxying
\t\t}}
\t\treverse_proxy {upstream} {{
\t\t\timport proxying
\t\t}}
\t}}
\thandle_errors {{
\t\t@down expression `{{err.message}}.contains("dial tcp")`
\t\thandle @down {{
\t\t\theader Retry-After 5
\t\t\trespond "llamavm: {down}" 503
\t\t}}
\t\thandle {{
\t\t\theader Retry-After 5
\t\t\trespond "llamavm: the serving model broke off this request before answering — retry" 502
\t\t}}
\t}}
}}
"""


def service(cat: catalog_mod.Catalog, site: Site, image: str) -> dict[str, Any]:
    """The front-door service of compose.yaml: Caddy from switchd's image, unprivileged, its
    port on the bind address."""
    port = cat.settings.reserved_ports["proxy"]
    return {
        "image": image,
        "container_name": CONTAINER,
        "entrypoint": ["caddy"],
        "command": ["run", "--config", CONFIG, "--adapter", "caddyfile"],
        "user": f"{UID}:{UID}",
        "labels": {f"{LABEL}.kind": SERVICE},
        "init": True,
        "depends_on": ["control"],
        "environment": {
            "XDG_DATA_HOME": DATA_DIR,
            "XDG_CONFIG_HOME": "/tmp",
            "HOME": "/tmp",
            # A proxy of a few requests a second needs one CPU; every other is the model's.
            "GOMAXPROCS": "1",
        },
        "ports": [published(site.bind_address, port)],
        "volumes": [{"type": "volume", "source": DATA_VOLUME, "target": DATA_DIR}],
        "read_only": True,
        "tmpfs": ["/tmp"],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "restart": "unless-stopped",
    }
