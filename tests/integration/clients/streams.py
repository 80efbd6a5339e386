"""Bursts of chat completions as LAN devices send them, run inside the LAN client's namespace by
bench/load.py and tests/integration/test_load.py:

    python streams.py < SPEC      prints one JSON line: every request's outcome, burst by burst

SPEC (JSON on stdin): {"bursts": [{"target": NAME, "url": BASE, "requests": N, "concurrency": C,
"stream": BOOL, "models": [MODEL, ...], "max_tokens": T}, ...]}. Requests name `models` in turn.
Each target keeps one client for the whole run, as an OpenAI client does: keep-alive on, a pool
of up to C connections reused across its bursts (with idle gaps while other targets run). The
key comes from $LLAMAVM_KEY (never a command line).

A request is "ok" only when it answered 200 and is complete: a stream ends with `data: [DONE]`
after a chunk with a finish_reason, a plain answer is JSON with a finish_reason. Anything else is
an error of a kind: http-503, truncated, RemoteProtocolError, ... Times: `first` is the first
token (the first streamed chunk with content; for a plain answer, the whole answer), `end` the
last byte, both from the moment the request was handed to the client; `served` the model that
answered (its "model" field).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import httpx

TIMEOUT = httpx.Timeout(600.0, connect=30.0)


def complete_stream(body: bytes) -> str | None:
    """None when `body` is a whole SSE chat stream, else why not."""
    events = [line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")]
    if not events or events[-1] != b"[DONE]":
        return "truncated"
    finished = False
    for raw in events[:-1]:
        try:
            chunk = json.loads(raw)
        except ValueError:
            return "bad-event"
        if "error" in chunk:
            return "error-event"
        finished = finished or any(c.get("finish_reason") for c in chunk.get("choices", []))
    return None if finished else "no-finish-reason"


def complete_answer(body: bytes) -> str | None:
    try:
        answer = json.loads(body)
    except ValueError:
        return "bad-json"
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not choices or not choices[0].get("finish_reason"):
        return "no-finish-reason"
    return None


def served_by(body: bytes, stream: bool) -> str | None:
    """The model that answered (its "model" field: llama-server's alias, the model's name)."""
    if not stream:
        answer = json.loads(body)
        return answer.get("model") if isinstance(answer, dict) else None
    for line in body.split(b"\n"):
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            chunk = json.loads(line[5:])
            if isinstance(chunk, dict) and chunk.get("model"):
                return str(chunk["model"])
    return None


async def one(client: httpx.AsyncClient, spec: dict[str, Any], i: int) -> dict[str, Any]:
    models = spec["models"]
    body = {
        "model": models[i % len(models)],
        "messages": [{"role": "user", "content": f"Hello number {i}, who are you?"}],
        "max_tokens": spec.get("max_tokens", 16),
        "stream": spec["stream"],
    }
    began = time.monotonic()
    first: float | None = None
    data = b""
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
            async for chunk in answer.aiter_bytes():
                if first is None and (not spec["stream"] or b'content":"' in chunk):
                    first = time.monotonic() - began
                data += chunk
            status = answer.status_code
    except httpx.HTTPError as exc:
        return {"ok": False, "kind": type(exc).__name__, "detail": str(exc)[:200]}
    end = time.monotonic() - began
    if status != 200:
        return {
            "ok": False,
            "kind": f"http-{status}",
            "detail": data[:200].decode(errors="replace"),
        }
    why = complete_stream(data) if spec["stream"] else complete_answer(data)
    if why:
        return {"ok": False, "kind": why, "detail": data[-200:].decode(errors="replace")}
    return {"ok": True, "first": end if first is None else first, "end": end, "at": began,
            "served": served_by(data, spec["stream"])}  # fmt: skip


async def burst(client: httpx.AsyncClient, spec: dict[str, Any]) -> dict[str, Any]:
    gate = asyncio.Semaphore(spec["concurrency"])

    async def limited(i: int) -> dict[str, Any]:
        async with gate:
            return await one(client, spec, i)

    began = time.monotonic()
    results = await asyncio.gather(*(limited(i) for i in range(spec["requests"])))
    return {**spec, "seconds": time.monotonic() - began, "results": results}


async def run(spec: dict[str, Any]) -> list[dict[str, Any]]:
    key = os.environ.get("LLAMAVM_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    widest = max((b["concurrency"] for b in spec["bursts"]), default=1)
    clients: dict[str, httpx.AsyncClient] = {}
    try:
        done = []
        for b in spec["bursts"]:
            if b["target"] not in clients:
                clients[b["target"]] = httpx.AsyncClient(
                    base_url=b["url"],
                    headers=headers,
                    timeout=TIMEOUT,
                    limits=httpx.Limits(max_connections=widest, max_keepalive_connections=widest),
                )
            done.append(await burst(clients[b["target"]], b))
        return done
    finally:
        for client in clients.values():
            await client.aclose()


def main() -> int:
    spec = json.load(sys.stdin)
    print(json.dumps({"bursts": asyncio.run(run(spec))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
