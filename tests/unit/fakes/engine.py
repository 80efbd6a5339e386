"""A container engine for the Compose runtime's eyes only: FakeSystemd's model units seen as the
containers of a Compose project (a unit's name is its container's), answering the calls of
llamavm.host.engine.EngineApi. The same fake units, clock and behaviours (load, crash, stall,
exit) under both runtimes: the transaction's tests run through either side of the seam."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from llamavm.host import contract as contract_mod
from tests.unit.fakes.host import FakeSystemd

LABEL = "io.llamavm.model"


def compose_contract(contract: contract_mod.Contract) -> contract_mod.Contract:
    """`contract` with its models run as Compose containers on a (fake) engine."""
    spec = contract_mod.RuntimeSpec(kind="compose", socket="/run/fake-engine.sock", label=LABEL)
    return replace(contract, runtime=spec)


class FakeEngine:
    """The engine's API over `fake`'s units. A unit that loads or runs is a running container
    (its /health says whether it is ready), one that systemd restarts is restarting (the
    restart policy's), a failed one exited with 1, a stopped one exited with 143."""

    def __init__(self, fake: FakeSystemd) -> None:
        self.fake = fake
        self.calls: list[tuple[str, ...]] = []

    def _models(self) -> set[str]:
        return set(self.fake.ports.values())

    def _container(self, name: str) -> dict[str, Any] | None:
        if name not in self.fake.units:
            return None
        props = self.fake.props(name, "ActiveState", "SubState", "MainPID", "InvocationID")
        active, sub = props["ActiveState"], props["SubState"]
        if sub == "auto-restart":
            status, code = "restarting", 1
        elif active in ("active", "activating", "reloading"):
            status, code = "running", 0
        elif active == "failed":
            status, code = "exited", 1
        else:
            status, code = ("exited", 143) if props["InvocationID"] else ("created", 0)
        return {
            "Name": "/" + name,
            "State": {"Status": status, "ExitCode": code, "OOMKilled": False,
                      "Pid": int(props["MainPID"]) if status == "running" else 0,
                      "StartedAt": props["InvocationID"] or "0001-01-01T00:00:00Z"},
            "RestartCount": int(props["NRestarts"]),
        }  # fmt: skip

    def containers(self, label: str) -> list[dict[str, Any]]:
        self.calls.append(("list", label))
        out = []
        for name in sorted(self._models()):
            data = self._container(name)
            if data is None:
                continue
            state = data["State"]
            text = (
                f"Exited ({state['ExitCode']}) 1 second ago" if state["Status"] == "exited" else ""
            )
            out.append({"Names": [data["Name"]], "State": state["Status"], "Status": text})
        return out

    def inspect(self, name: str) -> dict[str, Any] | None:
        return self._container(name)

    def start(self, name: str) -> str:
        self.calls.append(("start", name))
        return self.fake.start(name)

    def stop(self, name: str, grace_s: int = 30) -> None:
        self.calls.append(("stop", name))
        self.fake.stop([name])

    def logs(self, name: str, lines: int = 25) -> str:
        return self.fake.journal_tail(name, lines)

    def usage(self, name: str) -> tuple[int, ...] | None:
        unit = self.fake.units.get(name)
        return self.fake.counters(unit.pid) if unit and unit.pid else None
