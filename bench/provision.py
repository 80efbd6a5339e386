"""A no-op `invoke provision` against a bare Ansible fact run, and a hand edit repaired.

Run as root on a provisioned target (`invoke provision` first):

    .venv/bin/python bench/provision.py [--runs 5] [-i local] [-i local-vm] [--no-full]
        [--no-model]

In one run: the baseline, `ansible HOSTS -m setup` (connect, gather every fact, nothing else);
the no-op `invoke provision` (validation, the llama.cpp source, the host contract, the drift
probe; every host up to date, its roles skipped), medians of --runs and their ratio (goal: at
most 3x for the test bed, at most 60 s for the TCG VM); then a model host's unit edited by hand
(`llamavm-control.service`), the next provision's time and what it said (it must name the file
and repair it), and one more no-op provision. Last, a model added to the catalog: the provision
that converges only the roles reading the models, against `--full` with the same catalog, and
the provision back to the catalog as it was.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from llamavm import REPO_ROOT
from llamavm.inputs import catalog as catalog_mod
from llamavm.inputs import inventory as inventory_mod
from llamavm.ops import remote

BIN = REPO_ROOT / ".venv" / "bin"
UNIT = "/etc/systemd/system/llamavm-control.service"


def timed(argv: list[str], cwd=REPO_ROOT) -> tuple[float, subprocess.CompletedProcess[str]]:
    began = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - began
    if proc.returncode != 0:
        sys.exit(f"{shlex.join(argv)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return elapsed, proc


def on_host(host: remote.Host, command: str) -> str:
    proc = remote.run(host, ["bash", "-c", command], stream=False, timeout=60)
    if proc.returncode != 0:
        sys.exit(f"{host.name}: {command!r} failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "-i",
        "--inventory",
        action="append",
        help="default: local (the test bed); repeat for several in one run (-i local -i local-vm)",
    )
    parser.add_argument(
        "--no-full", action="store_true", help="skip the --full baseline (a TCG VM's takes ~10 min)"
    )
    parser.add_argument(
        "--no-model",
        action="store_true",
        help="skip the model added to the catalog (under TCG its provisions take ~15 min)",
    )
    args = parser.parse_args()
    ok = [
        measure(inventory, args.runs, not args.no_full, not args.no_model)
        for inventory in args.inventory or [None]
    ]
    return 0 if all(ok) else 1


def measure(inventory: str | None, runs: int, full: bool, model: bool = True) -> bool:
    """One inventory's rows: the no-op against a fact run, the hand edit, the model added."""
    inv = inventory_mod.resolve(inventory)
    provision = [str(BIN / "invoke"), "provision"] + (["-i", inventory] if inventory else [])
    setup = [str(BIN / "ansible"), "-i", str(inv.path), remote.GROUP, "-m", "setup"]

    timed(provision)  # converged and recorded before anything is measured
    facts, noop = [], []
    for _ in range(runs):  # interleaved: both see the same machine load
        facts.append(timed(setup, cwd=REPO_ROOT / "ansible")[0])
        seconds, proc = timed(provision)
        if "up to date" not in proc.stdout or "no changes" not in proc.stdout:
            sys.exit(f"the no-op provision was not skipped:\n{proc.stdout[-3000:]}")
        noop.append(seconds)
    base, mine = statistics.median(facts), statistics.median(noop)
    print(f"inventory {inv.path.name}, {runs} runs each, medians")
    print(f"| ansible {remote.GROUP} -m setup (baseline) | {base:.2f} s | 1.00x |")
    print(f"| no-op invoke provision | {mine:.2f} s | {mine / base:.2f}x |")

    host = remote.hosts(inv.path)[0]
    before = on_host(host, f"sha256sum {UNIT}").split()[0]
    on_host(host, f"echo '# edited by hand' >> {UNIT}")
    seconds, proc = timed(provision)
    said = [line for line in proc.stdout.splitlines() if UNIT in line]
    after = on_host(host, f"sha256sum {UNIT}").split()[0]
    repaired = after == before and any("repaired" in line for line in said)
    print(
        f"| provision after a hand edit of {UNIT} | {seconds:.2f} s | "
        f"{seconds / base:.2f}x | {'repaired' if repaired else 'NOT repaired'} |"
    )
    for line in said:
        print(f"    {line}")
    seconds, proc = timed(provision)
    print(f"| the next no-op provision | {seconds:.2f} s | {seconds / base:.2f}x |")
    partial = added_model(provision, inv, base, full=full) if model else True
    return repaired and partial


def added_model(
    provision: list[str], inv: inventory_mod.Inventory, base: float, full: bool = True
) -> bool:
    """One model more in the catalog: the roles that read the models converge, not the rest."""
    source = catalog_mod.catalog_path(None, inv.catalog)
    cat = catalog_mod.load(source)
    data = yaml.safe_load(Path(source).read_text())
    taken = {m.port for m in cat.models} | set(cat.settings.reserved_ports.values())
    port = next(p for p in range(8050, 8100) if p not in taken)
    entry = next(dict(m) for m in data["models"] if m["name"] == cat.default.name)
    entry.update(name="bench-added", port=port, aliases=[])
    data["models"].append(entry)
    with tempfile.TemporaryDirectory(prefix="llamavm-bench-") as tmp:
        path = Path(tmp) / Path(source).name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        with_it = [*provision, "--catalog", str(path)]
        seconds, proc = timed(with_it)
        said = [line for line in proc.stdout.splitlines() if "(no drift): converging" in line]
        print(
            f"| provision with a model added (only the roles reading the models) | "
            f"{seconds:.2f} s | {seconds / base:.2f}x | {'partial' if said else 'NOT partial'} |"
        )
        for line in said:
            print(f"    {line}")
        if full:
            every, _ = timed([*with_it, "--full"])
            print(
                f"| the same catalog, --full (every role) | {every:.2f} s | {every / base:.2f}x |"
            )
    back, proc = timed(provision)
    print(f"| back to the catalog as it was | {back:.2f} s | {back / base:.2f}x |")
    return bool(said)


if __name__ == "__main__":
    sys.exit(main())
