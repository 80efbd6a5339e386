"""The firewall seam of the switch transaction, faked: the nftables set of open model ports
and where the front door leads."""

from __future__ import annotations

from llamavm.host import EXIT_REFUSED
from llamavm.host.contract import Firewall, HostError


class FakeNft:
    """The nftables set of open model ports; `loaded` False: the table was deleted."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = list(ports)
        self.front: int | None = ports[0] if ports else None  # where the front door leads
        self.loaded = True
        self.fail_updates = False
        self.log: list[str] = []

    def state(self, fw: Firewall) -> list[int]:
        if not self.loaded:
            raise HostError("firewall: the nftables set is not loaded", EXIT_REFUSED)
        return sorted(self.ports)

    def set_open(self, fw: Firewall, ports: list[int], front: int | None = None) -> bool:
        wanted = front if front is not None else (min(ports) if ports else None)
        if self.state(fw) == sorted(ports) and self.front == wanted:
            return False
        if self.fail_updates:
            raise HostError("firewall: nft refused the update: boom")
        self.log.append(f"open {sorted(ports)}")
        self.ports = list(ports)
        self.front = wanted
        return True

    def hold(self, fw: Firewall) -> bool:
        self.state(fw)
        self.log.append("hold")
        changed, self.front = self.front is not None, None
        return changed
