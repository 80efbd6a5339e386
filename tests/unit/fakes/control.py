"""The control service's seams, faked: the privileged helper (a host serving one model,
switches that take a moment), the model servers behind it, and the application on a contract
of VALID. The key is KEY; AUTH is the header that sends it."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from llamavm.artifacts import contract
from llamavm.host import control
from llamavm.host.contract import parse as parse_contract
from llamavm.inputs import catalog
from tests.unit.fakes.catalog import VALID, catalog_file

KEY = "k" * 40


class FakeHelper:
    """The privileged helper's side: a host serving one model, switches that take a moment."""

    def __init__(self, serving: str | None = "alpha", fail: dict[str, Any] | None = None):
        self.serving = serving
        self.fail = fail
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.in_switch = False

    async def events(self, op: str, **fields: str) -> AsyncIterator[dict[str, Any]]:
        self.calls.append((op, fields))
        if op == "status":
            yield {"event": "outcome", "ok": True, "code": 0, "active": self.serving,
                   "models": [{"name": "alpha", "loads": [0.5]}, {"name": "beta", "loads": []}],
                   "gpus": [], "system": {"cpus": 2}}  # fmt: skip
            return
        if self.fail:
            yield {"event": "outcome", **self.fail}
            return
        assert not self.in_switch, "two transactions at once"
        self.in_switch = True
        yield {"event": "progress", "message": f"{op} begins"}
        self.serving = None
        await asyncio.sleep(0.01)
        self.serving = fields.get("model") if op in ("switch", "restart") else None
        if op == "restart":
            self.serving = "alpha"
        self.in_switch = False
        yield {"event": "progress", "message": f"{op} done"}
        yield {"event": "outcome", "ok": True, "code": 0, "model": self.serving, "changed": True}

    async def call(self, op: str, **fields: str) -> dict[str, Any]:
        return await control.Helper.call(self, op, **fields)  # type: ignore[arg-type]


def control_contract(tmp_path, routing: bool = True, policy: str = "required", presets=True):
    """The host contract of VALID with the control service (routing on or off), the key
    policy and beta's reasoning presets; its catalog written under tmp_path."""
    data = copy.deepcopy(VALID)
    data["settings"]["api_key"]["policy"] = policy
    data["settings"]["control"] = {"routing": routing}
    if presets:
        data["models"][1]["reasoning"] = {"effort": "low", "presets": ["low", "high"]}
    path = catalog_file(tmp_path, data)
    return parse_contract(contract.build(catalog.load(path), {}))


class Upstream:
    """The model servers: answer only on the port of the model the fake host serves."""

    def __init__(self, fake: FakeHelper, host_contract) -> None:
        self.fake = fake
        self.ports = {m.port: m.name for m in host_contract.models}
        self.seen: list[tuple[str, dict[str, Any], str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        name = self.ports.get(request.url.port)
        if name != self.fake.serving:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content)
        self.seen.append((name, body, request.headers.get("authorization", "")))
        return httpx.Response(200, json={"model": name, "choices": [{"text": "hi"}]})


def control_app(tmp_path, fake=None, key=KEY, **kwargs):
    """The control application on control_contract(tmp_path, **kwargs) with a fake helper and
    fake model servers: (app, helper, model servers)."""
    host = control_contract(tmp_path, **kwargs)
    fake = fake or FakeHelper()
    upstream = Upstream(fake, host)
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    return control.create_app(host, fake, key, upstream=client), fake, upstream


AUTH = {"Authorization": f"Bearer {KEY}"}
