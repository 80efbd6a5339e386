"""Fleet scaling: `invoke switch` and a no-op `invoke provision` on 1, 2 and 4 hosts, one run.

Run on the local fleet, provisioned once (`invoke provision -i local-fleet`), as root:

    .venv/bin/python bench/fleet.py [--runs 3] [--provision-runs 1]

Each size is a host pattern (fleet-1; fleet-1:fleet-2; llamavm_hosts). A switch moves every
named host to the other catalog model (alternating, so each run really swaps), timed end to end
from the controller; medians. The no-op provision is `invoke provision --limit PATTERN` on hosts
already converged (changed=0 is checked). Ratios are against one host in the same run (goals:
4 hosts within 1.5x of one for a switch, within 2x for a no-op provision). A switch's wall time
is split into the slowest host's own transaction (as the host timed it) and the rest, the
controller's part (SSH, checks, waiting): on the test bed the "hosts" share the machine's cores,
so the hosts' own part grows with their number, which it would not on separate machines.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time

from llamavm import REPO_ROOT

INVOKE = REPO_ROOT / ".venv" / "bin" / "invoke"
INVENTORY = "local-fleet"
SIZES = {1: "fleet-1", 2: "fleet-1:fleet-2", 4: "llamavm_hosts"}
MODELS = ("qwen3-coder-30b", "gpt-oss-120b")


def timed(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    began = time.monotonic()
    done = subprocess.run([str(INVOKE), *args], capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - began
    if done.returncode != 0:
        sys.exit(f"bench/fleet.py: invoke {' '.join(args)} failed:\n{done.stdout[-3000:]}")
    return elapsed, done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="switches per size")
    parser.add_argument("--provision-runs", type=int, default=1, help="no-op provisions per size")
    args = parser.parse_args()
    # Every host on the first model first, so each timed switch is a real swap on each host.
    timed("switch", "--model", MODELS[0], "-i", INVENTORY)
    switch: dict[int, list[float]] = {n: [] for n in SIZES}
    provision: dict[int, list[float]] = {n: [] for n in SIZES}
    slowest: dict[int, list[float]] = {n: [] for n in SIZES}
    for _ in range(args.runs):
        for n, pattern in SIZES.items():
            # Two swaps per run and size: there and back, all named hosts at once.
            for model in (MODELS[1], MODELS[0]):
                elapsed, done = timed(
                    "switch", "--model", model, "-i", INVENTORY, "--host", pattern, "--json"
                )
                answers = json.loads(done.stdout)
                if len(answers) != n or not all(a.get("changed") for a in answers.values()):
                    sys.exit(f"bench/fleet.py: not {n} real swaps: {done.stdout[-2000:]}")
                switch[n].append(elapsed)
                # The slowest host's own transaction (as it timed it): what no controller
                # parallelism can hide. The rest of the wall time is the controller's.
                slowest[n].append(max(a["seconds"] for a in answers.values()))
    for _ in range(args.provision_runs):
        for n, pattern in SIZES.items():
            elapsed, done = timed("provision", "-i", INVENTORY, "--limit", pattern)
            changed = [int(c) for c in re.findall(r"changed=(\d+)", done.stdout)]
            if len(changed) != n or any(changed):
                sys.exit(f"bench/fleet.py: provision --limit {pattern} was not a no-op: {changed}")
            provision[n].append(elapsed)
    rows = {}
    for n in SIZES:
        rows[n] = {
            "switch_s": round(statistics.median(switch[n]), 2),
            "slowest_host_s": round(statistics.median(slowest[n]), 2),
            "controller_s": round(
                statistics.median(w - h for w, h in zip(switch[n], slowest[n], strict=True)), 2
            ),
            "provision_noop_s": round(statistics.median(provision[n]), 1),
        }
    for n in SIZES:
        rows[n]["switch_ratio"] = round(rows[n]["switch_s"] / rows[1]["switch_s"], 2)
        rows[n]["controller_ratio"] = round(rows[n]["controller_s"] / rows[1]["controller_s"], 2)
        rows[n]["slowest_host_ratio"] = round(
            rows[n]["slowest_host_s"] / rows[1]["slowest_host_s"], 2
        )
        rows[n]["provision_ratio"] = round(
            rows[n]["provision_noop_s"] / rows[1]["provision_noop_s"], 2
        )
    print(
        f"{'hosts':>5}  {'switch':>7} {'ratio':>5}  {'slowest host':>12} {'ratio':>5}  "
        f"{'controller':>10} {'ratio':>5}  {'no-op provision':>15} {'ratio':>5}"
    )
    for n, row in rows.items():
        print(
            f"{n:>5}  {row['switch_s']:>6.2f}s {row['switch_ratio']:>4.2f}x  "
            f"{row['slowest_host_s']:>11.2f}s {row['slowest_host_ratio']:>4.2f}x  "
            f"{row['controller_s']:>9.2f}s {row['controller_ratio']:>4.2f}x  "
            f"{row['provision_noop_s']:>14.1f}s {row['provision_ratio']:>4.2f}x"
        )
    print(json.dumps({"runs": args.runs, "switches_per_size": 2 * args.runs, "sizes": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
