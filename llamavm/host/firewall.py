"""The active model's port (and its companions') in the firewall: one nftables set the switch
keeps current.

The expose role loads the rule set (table inet llamavm, from firewall.nft in the contract's
config folder): SSH and the enabled services are open, a model port only while it is in the
set `model_ports`. With a front door, the map `front_door` redirects its internal port
(127.0.0.1 only) to the same model's port, so the front door always reaches the serving model
and nothing else.
With kept connections to the model (the control service runs), the front door keeps two sets
of them and the file `front_door_flag` says which one serves its next request: the switch
turns it over whenever the map leaves a target, so a connection kept to a model the front door
left (one being drained, then stopped) never carries a new request, and the map's hold points
at the control service's wake listener, which holds a request until the switch is over and
then passes it to whichever model serves.
Reloading that file keeps the set's elements, so only a transaction changes them: it opens the
new model's port once that model is healthy and verified, and a rollback puts back the port
of the model that serves again.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llamavm.host import EXIT_REFUSED, store
from llamavm.host.contract import Firewall, HostError

NFT = "/usr/sbin/nft"


def _nft(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [NFT, *args], input=stdin, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"firewall: cannot run {NFT}: {exc}") from None


def _missing(fw: Firewall, stderr: str) -> HostError:
    return HostError(
        f"firewall: the nftables set inet {fw.table} {fw.set} is not loaded "
        f"({stderr.strip().splitlines()[-1] if stderr.strip() else 'no such set'}) — "
        f"run 'systemctl restart {fw.unit}' or 'invoke provision' "
        "(or set settings.expose.firewall: false)",
        EXIT_REFUSED,
    )


def _listing(fw: Firewall) -> list[dict[str, Any]]:
    run = _nft(["-j", "list", "table", "inet", fw.table])
    if run.returncode != 0:
        raise _missing(fw, run.stderr)
    try:
        return [item for item in json.loads(run.stdout)["nftables"] if isinstance(item, dict)]
    except (ValueError, KeyError, TypeError):
        raise HostError(f"firewall: nft list table answered {run.stdout[:200]!r}") from None


def _elements(items: list[dict[str, Any]], kind: str, name: str) -> list[Any] | None:
    found = next((i[kind] for i in items if i.get(kind, {}).get("name") == name), None)
    return None if found is None else list(found.get("elem", []))


def state(fw: Firewall) -> tuple[list[int], int | None]:
    """(the model ports open now, the port the front door reaches or None); HostError
    (refused) when the table isn't loaded."""
    items = _listing(fw)
    ports = _elements(items, "set", fw.set)
    if ports is None:
        raise _missing(fw, f"no set {fw.set}")
    target = None
    if fw.front_door_map:
        pairs = _elements(items, "map", fw.front_door_map)
        if pairs is None:
            raise _missing(fw, f"no map {fw.front_door_map}")
        target = next((int(p[1]) for p in pairs if isinstance(p, list) and len(p) == 2), None)
    return sorted(int(e) for e in ports if isinstance(e, int)), target


def open_ports(fw: Firewall) -> list[int]:
    """The model ports the firewall lets in now; HostError (refused) when it isn't loaded."""
    return state(fw)[0]


def batch(fw: Firewall, ports: Iterable[int], front_door: int | None = None) -> str:
    """One nft transaction: the set holds exactly `ports`, the front door's map sends its
    internal port to `front_door` (or nowhere: requests wait) — all of it, or nothing."""
    lines = [f"flush set inet {fw.table} {fw.set}"]
    wanted = sorted(set(ports))
    if wanted:
        lines.append(f"add element inet {fw.table} {fw.set} {{ {', '.join(map(str, wanted))} }}")
    if fw.front_door_map:
        lines.append(f"flush map inet {fw.table} {fw.front_door_map}")
        if front_door:
            lines.append(
                f"add element inet {fw.table} {fw.front_door_map} "
                f"{{ {fw.front_door_port} : {front_door} }}"
            )
    return "\n".join(lines) + "\n"


def turn_pools(fw: Firewall) -> None:
    """Send the front door's next requests through its other set of kept connections (Caddy's
    `file` matcher looks for the flag on every request; only root writes it)."""
    flag = Path(fw.front_door_flag)
    try:
        store.secure_dir(flag.parent, 0o755)
        if flag.exists():
            flag.unlink()
        else:
            flag.touch(mode=0o644)
    except OSError as exc:
        raise HostError(f"front door: cannot turn over {flag}: {exc}") from None


def _apply(fw: Firewall, ports: list[int], front_door: int | None) -> bool:
    before = state(fw)
    if before == (ports, front_door if fw.front_door_map else None):
        return False
    # The front door leaves a target: a connection it kept there must carry no new request.
    # Towards a model, the other set of connections first (a request in between reaches the
    # target left, which serves or holds it); towards nothing or the wake listener, the map
    # first (one in between reaches the wake listener, which holds it, through the set left).
    leaving = bool(fw.front_door_flag) and before[1] not in (None, front_door)
    towards_model = front_door not in (None, fw.wake_port)
    if leaving and towards_model:
        turn_pools(fw)
    run = _nft(["-f", "-"], batch(fw, ports, front_door))
    if run.returncode != 0:
        raise HostError(f"firewall: nft refused the update: {run.stderr.strip()[-300:]}")
    if leaving and not towards_model:
        turn_pools(fw)
    return True


def set_open(fw: Firewall, ports: Iterable[int], front: int | None = None) -> bool:
    """Open exactly `ports` to the LAN and point the front door at `front` (default: the
    lowest of them), atomically; True when that changed anything."""
    wanted = sorted(set(ports))
    return _apply(fw, wanted, front if front is not None else (wanted[0] if wanted else None))


def hold(fw: Firewall) -> bool:
    """The front door reaches no model: its requests wait — in the control service's wake
    listener when the front door keeps connections, else in the front door, which dials again
    until a model is exposed. The open ports stay as they are."""
    if not fw.front_door_map:
        return False
    waiting = fw.wake_port if fw.front_door_flag and fw.wake_port else None
    return _apply(fw, open_ports(fw), waiting)


def wake(fw: Firewall, ports: Iterable[int] = ()) -> bool:
    """While the model sleeps: every model port closed but `ports` (the companions beside it,
    which stay), the front door's internal port sent to the control service's wake listener
    (or nowhere without one: its requests wait)."""
    return _apply(fw, sorted(set(ports)), fw.wake_port or None)
