"""The test bed's private LAN: a bridge in its own namespace, and veths into it.

Topology (names and addresses come from config/testbed.yaml):

    root ns (controller) --veth--+
    ns host (container)  --veth--+-- bridge in ns lan
    ns client            --veth--+

Nothing is routed anywhere else: no default routes, no forwarding, no NAT. Below the LAN, thin
helpers around iproute2 for network namespaces and links (one job: run `ip`).
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamavm.errors import LlamavmError

NETNS_DIR = Path("/run/netns")


# --------------------------------------------------------------------------- iproute2


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip [-n NS] ARGS...`; raise LlamavmError with ip's message when check fails."""
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise LlamavmError(f"`{' '.join(cmd)}` failed: {detail}")
    return proc


def ns_path(name: str) -> Path:
    """The bind-mount path of a named network namespace."""
    return NETNS_DIR / name


def ns_exists(name: str) -> bool:
    """True when `ip netns add NAME` has been done and not undone."""
    return ns_path(name).exists()


def ns_list() -> list[str]:
    """Names of all named network namespaces."""
    proc = ip("netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def ns_ensure(name: str) -> None:
    """Create the namespace NAME (if missing) and bring its loopback up."""
    if not ns_exists(name):
        ip("netns", "add", name)
    ip("link", "set", "lo", "up", ns=name)


def ns_delete(name: str) -> None:
    """Delete the namespace NAME if present (its links go with it)."""
    if ns_exists(name):
        ip("netns", "delete", name)


def link_exists(name: str, ns: str | None = None) -> bool:
    """True when a link NAME exists in NS (or the current namespace)."""
    if ns is not None and not ns_exists(ns):
        return False
    return ip("link", "show", "dev", name, ns=ns, check=False).returncode == 0


def link_names(ns: str | None = None) -> list[str]:
    """Names of the links in NS (or the current namespace), without the @peer suffix."""
    proc = ip("-o", "link", "show", ns=ns, check=False)
    names = []
    for line in proc.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


# --------------------------------------------------------------------------- the LAN


@dataclass(frozen=True)
class LanConfig:
    """The LAN's names and addresses."""

    subnet: ipaddress.IPv4Network
    controller: str
    host: str
    client: str
    ns_lan: str
    ns_host: str
    ns_client: str
    bridge: str
    controller_if: str
    host_if: str
    client_if: str
    controller_port: str
    host_port: str
    client_port: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LanConfig:
        """Build from the `network:` mapping of config/testbed.yaml, validating it."""
        try:
            subnet = ipaddress.IPv4Network(data["subnet"])
            cfg = cls(
                subnet=subnet,
                controller=str(data["controller"]),
                host=str(data["host"]),
                client=str(data["client"]),
                ns_lan=data["namespaces"]["lan"],
                ns_host=data["namespaces"]["host"],
                ns_client=data["namespaces"]["client"],
                bridge=data["bridge"],
                controller_if=data["controller_if"],
                host_if=data["host_if"],
                client_if=data["client_if"],
                controller_port=data["controller_port"],
                host_port=data["host_port"],
                client_port=data["client_port"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LlamavmError(f"config/testbed.yaml: bad `network` section: {exc!r}") from exc
        for addr in (cfg.controller, cfg.host, cfg.client):
            if ipaddress.IPv4Address(addr) not in subnet:
                raise LlamavmError(f"config/testbed.yaml: {addr} is not in {subnet}")
        for name in cfg.interface_names():
            if len(name) > 15:
                raise LlamavmError(f"config/testbed.yaml: interface name {name!r} is too long")
        return cfg

    def interface_names(self) -> tuple[str, ...]:
        """Every interface name this LAN creates."""
        return (
            self.bridge,
            self.controller_if,
            self.host_if,
            self.client_if,
            self.controller_port,
            self.host_port,
            self.client_port,
        )

    def namespaces(self) -> tuple[str, str, str]:
        """The namespaces this LAN creates."""
        return (self.ns_lan, self.ns_host, self.ns_client)

    def cidr(self, addr: str) -> str:
        """ADDR/prefix on this LAN."""
        return f"{addr}/{self.subnet.prefixlen}"


def _check_subnet_free(cfg: LanConfig) -> None:
    """Refuse when the root namespace already routes our subnet through another interface."""
    proc = ip("-4", "route", "show", str(cfg.subnet), check=False)
    for line in proc.stdout.splitlines():
        if " dev " in line and f" dev {cfg.controller_if}" not in f" {line}":
            raise LlamavmError(
                f"the test-bed subnet {cfg.subnet} is already routed here ({line.strip()}); "
                "change `network.subnet` in config/testbed.yaml"
            )


def _disable_ipv6(ifname: str) -> None:
    """Keep the controller's veth IPv4-only so nothing but our addresses is ever spoken."""
    knob = Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
    if knob.exists():
        knob.write_text("1\n")


def _ensure_port(cfg: LanConfig, inner: str, port: str, ns: str | None) -> None:
    """Make the veth pair INNER (in NS, None = root) <-> PORT (on the bridge), both up."""
    if not link_exists(inner, ns=ns):
        if link_exists(port, ns=cfg.ns_lan):
            ip("link", "delete", port, ns=cfg.ns_lan)
        ip("link", "add", inner, "type", "veth", "peer", "name", port, "netns", cfg.ns_lan, ns=ns)
    ip("link", "set", port, "master", cfg.bridge, "up", ns=cfg.ns_lan)
    ip("link", "set", inner, "up", ns=ns)


def up(cfg: LanConfig) -> None:
    """Create the namespaces, bridge and veths with their addresses. Idempotent."""
    _check_subnet_free(cfg)
    for ns in cfg.namespaces():
        try:
            ns_ensure(ns)
        except LlamavmError as exc:
            raise LlamavmError(
                f"cannot create network namespace {ns!r} (needs root with CAP_SYS_ADMIN and "
                f"CAP_NET_ADMIN, and a kernel with network namespaces): {exc}"
            ) from exc
    if not link_exists(cfg.bridge, ns=cfg.ns_lan):
        ip("link", "add", cfg.bridge, "type", "bridge", ns=cfg.ns_lan)
    ip("link", "set", cfg.bridge, "up", ns=cfg.ns_lan)

    _ensure_port(cfg, cfg.controller_if, cfg.controller_port, None)
    _disable_ipv6(cfg.controller_if)
    ip("addr", "replace", cfg.cidr(cfg.controller), "dev", cfg.controller_if)

    _ensure_port(cfg, cfg.host_if, cfg.host_port, cfg.ns_host)
    ip("addr", "replace", cfg.cidr(cfg.host), "dev", cfg.host_if, ns=cfg.ns_host)

    _ensure_port(cfg, cfg.client_if, cfg.client_port, cfg.ns_client)
    ip("addr", "replace", cfg.cidr(cfg.client), "dev", cfg.client_if, ns=cfg.ns_client)


def attach(cfg: LanConfig, ns: str, inner: str, port: str, address: str) -> None:
    """One more host on the LAN: namespace `ns` with veth `inner` (address `address`) whose
    peer `port` is on the bridge. Idempotent. (The test bed's LAN must be up.)"""
    ns_ensure(ns)
    _ensure_port(cfg, inner, port, ns)
    ip("addr", "replace", cfg.cidr(address), "dev", inner, ns=ns)


def detach(cfg: LanConfig, ns: str, port: str) -> None:
    """Undo attach(): the namespace (and its veth) and the bridge port go."""
    ns_delete(ns)
    if link_exists(port, ns=cfg.ns_lan):
        ip("link", "delete", port, ns=cfg.ns_lan)


def down(cfg: LanConfig) -> None:
    """Delete the controller's veth and the namespaces (with everything in them). Idempotent."""
    if link_exists(cfg.controller_if):
        ip("link", "delete", cfg.controller_if)
    for ns in reversed(cfg.namespaces()):
        ns_delete(ns)


def is_up(cfg: LanConfig) -> bool:
    """True when every namespace and the controller's veth exist."""
    return all(ns_exists(ns) for ns in cfg.namespaces()) and link_exists(cfg.controller_if)


def leftovers(cfg: LanConfig) -> dict[str, list[str]]:
    """What of this LAN exists right now (empty lists when fully torn down)."""
    names = set(cfg.interface_names())
    return {
        "namespaces": [ns for ns in ns_list() if ns in cfg.namespaces()],
        "links": [name for name in link_names() if name in names],
    }
