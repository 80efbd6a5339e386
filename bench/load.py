"""Every way in under load: the serving model's own port, the front door and the routing endpoint,
from the LAN client's namespace, in one run, interleaved.

Run on a provisioned test bed (`invoke provision` first), as root:

    .venv/bin/python bench/load.py [--requests 200] [--concurrency 8,32,64] [--modes stream,plain]
                                   [--rounds N] [--repeat R] [--max-tokens 16] [--key] [--switch]
                                   [--json FILE]

For each concurrency C and mode (streamed or not), each way in gets N requests, at most C at
once, split into bursts (of at least 2C and 50 requests, at most 10 of them, or `--rounds`) that
take turns with the other ways in (the order rotates each round), so all three see the same
machine; `--repeat R` runs each case's rounds R times (less noise in the ratios). The client
(tests/integration/clients/streams.py) is what an OpenAI client is: httpx, keep-alive on, one
connection pool per way in kept for the whole run. Prints requests/s, p50/p95 time to the first
token and to the end, every error by kind, and the ratios to the model port (requests/s: the
median of the rounds' ratios, each taken between bursts next to each other; p95 time to the
first token: of all rounds pooled, with the median of the rounds' own ratios beside it,
"rounds"; goals: zero errors through the front door and the routing endpoint; the front door
>= 0.95x and routing >= 0.9x the model port's requests/s; p95 first token within 1.2x the model
port's, pooled).

--key: the same with the key required (the test bed provisioned with its catalog's key policy on,
and back afterwards). --switch: instead, C concurrent streams (the largest C given) through the
front door while `invoke switch` moves the model and back, then through the routing endpoint
naming both models in turn; every request must answer 200 and complete, and a sampler on the host
counts the big models' servers every 50 ms (at most one at every sample).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamavm import REPO_ROOT
from llamavm.host.contract import CONTRACT_PATH
from llamavm.testbed import config

sys.path.insert(0, str(REPO_ROOT))
from tests.integration.load import finish, run_client, sampling, ssh, summary

INVOKE = Path(sys.executable).parent / "invoke"
WAYS = ("model", "front", "route")
LABELS = {"model": "model port", "front": "front door", "route": "routing endpoint"}


def host_json(path: str) -> dict[str, Any]:
    done = ssh(shlex.join(["sudo", "-n", "cat", path]))
    if done.returncode != 0:
        raise SystemExit(f"bench/load.py: cannot read {path} on the test bed: {done.stderr}")
    return json.loads(done.stdout)


def ways_in(contract: dict[str, Any], serving: str) -> dict[str, str]:
    """The base URL of each way in the host has: the serving model's port, the front door, the
    routing endpoint."""
    host = config.load_config().lan.host
    model = next(m for m in contract["models"] if m["name"] == serving)
    ways = {"model": f"http://{host}:{model['port']}"}
    if (contract.get("front_door") or {}).get("enabled"):
        scheme = "https" if contract["front_door"]["tls"] else "http"
        ways["front"] = f"{scheme}://{host}:{contract['front_door']['port']}"
    control = contract.get("control") or {}
    if control.get("enabled") and control.get("routing"):
        ways["route"] = f"http://{host}:{control['port']}"
    return ways


def interleaved(ways: dict[str, str], model: str, args: argparse.Namespace) -> list[dict]:
    """Every (concurrency, mode) case: the ways in take turns, `rounds` bursts each."""
    bursts = []
    order = list(ways)
    for c in args.concurrency:
        for mode in args.modes:
            # A burst of at least twice C requests (C at once, then C more as they end), as
            # many bursts as that leaves: the ways in take turns often, so a machine whose
            # speed drifts within seconds (this one does) shows it to all three alike.
            rounds = args.rounds or max(1, min(10, args.requests // max(2 * c, 50)))
            per_round = [args.requests // rounds] * rounds
            per_round[-1] += args.requests - sum(per_round)
            for r, n in enumerate(per_round * args.repeat):
                turn = order[r % len(order) :] + order[: r % len(order)]
                for way in turn:
                    bursts.append({
                        "target": way, "url": ways[way], "requests": n, "concurrency": c,
                        "stream": mode == "stream", "models": [model],
                        "max_tokens": args.max_tokens, "round": r,
                    })  # fmt: skip
    return bursts


def round_ratios(case: list[dict[str, Any]], way: str) -> list[float]:
    """`way`'s requests/s over the model port's, round by round: bursts next to each other in
    time, so the machine's drift between rounds cancels out."""
    rate = {(b["target"], b["round"]): b["requests"] / b["seconds"] for b in case}
    rounds = sorted({b["round"] for b in case})
    return [rate[(way, r)] / rate[("model", r)] for r in rounds if (way, r) in rate]


def round_first_p95_ratios(case: list[dict[str, Any]], way: str) -> list[float]:
    """`way`'s p95 time to the first token over the model port's, round by round (as
    round_ratios): one burst's tail follows how fast the machine ran in those seconds, so the
    tails of all rounds pooled compare the ways in at different speeds."""
    p95 = {(b["target"], b["round"]): summary([b])["first_p95"] for b in case}
    rounds = sorted({b["round"] for b in case})
    return [p95[(way, r)] / p95[("model", r)] for r in rounds if (way, r) in p95]


def report(done: list[dict[str, Any]], args: argparse.Namespace) -> tuple[list[dict], bool]:
    rows, met = [], True
    for c in args.concurrency:
        for mode in args.modes:
            stream = mode == "stream"
            case = [b for b in done if b["concurrency"] == c and b["stream"] == stream]
            base = summary([b for b in case if b["target"] == "model"])
            each = args.requests * args.repeat
            print(f"\n{c} at once, {each} requests each, {mode}:")
            print(
                f"  {'way in':18s} {'req/s':>7s} {'x model':>8s} {'first p50':>10s} "
                f"{'first p95':>10s} {'x model':>8s} {'rounds':>7s} {'end p50':>8s} "
                f"{'end p95':>8s}  errors"
            )
            for way in WAYS:
                bursts = [b for b in case if b["target"] == way]
                if not bursts:
                    continue
                s = summary(bursts)
                rps_ratio = statistics.median(round_ratios(case, way))
                first_ratio = s["first_p95"] / base["first_p95"]
                paired_first = statistics.median(round_first_p95_ratios(case, way))
                errors = ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items())) or "none"
                print(
                    f"  {LABELS[way]:18s} {s['rps']:7.2f} {rps_ratio:7.2f}x "
                    f"{s['first_p50'] * 1000:8.0f}ms {s['first_p95'] * 1000:8.0f}ms "
                    f"{first_ratio:7.2f}x {paired_first:6.2f}x {s['end_p50'] * 1000:6.0f}ms "
                    f"{s['end_p95'] * 1000:6.0f}ms  {errors}"
                )
                for sample in s["samples"]:
                    print(f"      {sample['kind']}: {sample.get('detail', '')[:160]!r}")
                if way != "model":
                    goal = 0.95 if way == "front" else 0.9
                    met = met and not s["errors"] and rps_ratio >= goal and first_ratio <= 1.2
                rows.append({"concurrency": c, "mode": mode, "way": way, **s,
                             "rps_ratio": rps_ratio, "first_p95_ratio": first_ratio,
                             "rounds_first_p95_ratio": paired_first})  # fmt: skip
    return rows, met


def invoke(*argv: str) -> float:
    began = time.monotonic()
    done = subprocess.run([str(INVOKE), *argv], cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench/load.py: invoke {' '.join(argv)}: {done.stderr.strip()}")
    return time.monotonic() - began


def across_switch(ways: dict[str, str], models: list[str], key: str | None,
                  args: argparse.Namespace) -> bool:  # fmt: skip
    """C streams through the front door while invoke switch moves the model and back; then
    through the routing endpoint naming both models in turn."""
    c = max(args.concurrency)
    met = True
    cases = [("front", [models[0]], True), ("route", models, False)]
    for way, named, switch_by_hand in cases:
        if way not in ways:
            continue
        invoke("switch", "--model", models[0])
        spec = {"bursts": [{
            "target": way, "url": ways[way], "requests": args.requests, "concurrency": c,
            "stream": True, "models": named, "max_tokens": args.max_tokens,
        }]}  # fmt: skip
        switches: list[float] = []
        with sampling() as seen:
            proc = run_client(spec, key)
            if switch_by_hand:
                time.sleep(1.0)
                switches = [invoke("switch", "--model", m) for m in (models[1], models[0])]
            done = finish(proc)
        s = summary(done)
        errors = ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items())) or "none"
        how = (
            f"invoke switch to {models[1]} and back ({switches[0]:.1f} s, {switches[1]:.1f} s)"
            if switch_by_hand else f"requests naming {' and '.join(models)} in turn"
        )  # fmt: skip
        print(
            f"{LABELS[way]}: {s['requests']} streams, {c} at once, {how}: "
            f"{s['requests'] - sum(s['errors'].values())} answered 200 and complete; errors: "
            f"{errors}; end p50/p95 {s['end_p50']:.2f}/{s['end_p95']:.2f} s; big models at once: "
            f"at most {seen['max']} in {seen['samples']} samples"
        )
        for sample in s["samples"]:
            print(f"      {sample['kind']}: {sample.get('detail', '')[:160]!r}")
        met = met and not s["errors"] and seen["max"] <= 1
    return met


@contextlib.contextmanager
def keyed() -> Iterator[None]:
    """The test bed with the key policy on, provisioned back afterwards."""
    from tests.integration.helpers import keyed_testbed

    with tempfile.TemporaryDirectory() as tmp, keyed_testbed(Path(tmp)):
        yield


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--requests", type=int, default=200, help="requests per way in and case")
    parser.add_argument("--concurrency", default="8,32,64", help="comma-separated")
    parser.add_argument("--modes", default="stream,plain", help="stream, plain or both")
    parser.add_argument(
        "--rounds", type=int, default=0,
        help="bursts per way in and case (default: as many as leave 2xC requests in each, <= 10)",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="run every case this many times")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--key", action="store_true", help="with the key required")
    parser.add_argument("--switch", action="store_true", help="the burst across switches")
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= {"stream", "plain"} or args.rounds < 0 or args.requests < 1:
        parser.error("--modes takes stream and/or plain; --requests at least 1, --rounds >= 0")
    if args.repeat < 1:
        parser.error("--repeat at least 1")
    with keyed() if args.key else contextlib.nullcontext():
        contract = host_json(str(CONTRACT_PATH))
        key = None
        if contract["api_key"]["policy"] == "required":
            key = ssh(f"sudo -n cat {shlex.quote(contract['api_key']['file'])}").stdout.strip()
        models = [m["name"] for m in contract["models"] if not m.get("companion")]
        invoke("switch", "--model", contract["default_model"])
        ways = ways_in(contract, contract["default_model"])
        print(
            f"bench/load.py: {', '.join(LABELS[w] + ' ' + u for w, u in ways.items())}; "
            f"key {'required' if key else 'off'}; serving {contract['default_model']}"
        )
        if args.switch:
            met = across_switch(ways, models, key, args)
            verdict = "met" if met else "NOT met"
            print(f"\ngoal (every request 200 and complete, one big model): {verdict}")
            return 0 if met else 1
        bursts = interleaved(ways, contract["default_model"], args)
        done = finish(run_client({"bursts": bursts}, key))
    rows, met = report(done, args)
    print(
        "\ngoals (zero errors through the front door and routing; front door >= 0.95x and "
        f"routing >= 0.9x the model port's req/s; p95 first token <= 1.2x): "
        f"{'met' if met else 'NOT met'}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
