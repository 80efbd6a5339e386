"""Loading a 1 GiB GGUF over real kernel NFS, and a switch with pre-warm, in one run.

Run as root on this machine after `invoke provision -i local-vm` (the model VM and the NFS
server VM, both under TCG here):

    .venv/bin/python bench/nfs.py

It writes a ~1 GiB f16 llama GGUF into the controller's share folder, provisions the embedded
VMs with the test bed's catalog plus two models of that file (`bench-share`: read from the
share; `bench-stage`: a staged local copy), which also seeds the NFS server's export, then, on
the model VM, with the page caches of the VM, the NFS server VM and this machine (which holds
the server's disk image) dropped where a step says "cold":

1. raw sequential read of the file over the mount (`dd`, cold): the physical baseline;
2. `bench-share` loaded from NFS, cold (`systemctl start`, which returns once /health is 200);
3. the same, warm, in the switch's conditions: every cache dropped, then the file read once
   into the VM's page cache (what the pre-warm does), then the unit started;
4. `bench-stage` loaded from its staged local copy (VM cache cold);
5. `llamavm-switch switch bench-share` from qwen3-coder-30b, everything cold: the pre-warm
   reads the share while qwen3-coder-30b serves; the downtime (old model stopped -> new one
   healthy) against the whole switch.

Goals (issue 10): cold NFS load >= 90% of the raw read rate; switch downtime within 1.2x of
the warm load. Ratios are against the baseline of this same run; each step runs `--runs N`
times (3), medians compared (TCG timings here vary by a third from run to run). `--keep`
leaves the bench models installed (otherwise the VMs are provisioned back to the test bed's
catalog); `--downtime` then runs steps 3 and 5 alone on them (the downtime goal, in one run).
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llamavm import paths  # noqa: E402
from llamavm.artifacts import tinymodel  # noqa: E402
from llamavm.inputs import catalog  # noqa: E402
from llamavm.platforms.vm import vmspec  # noqa: E402
from llamavm.testbed import machine  # noqa: E402

INVOKE = str(Path(sys.executable).parent / "invoke")
INVENTORY = "local-vm"
KEY = str(paths.local_vms() / "id_ed25519")
TESTBED_CATALOG = REPO / "config" / "models.testbed.yaml"
BIG = tinymodel.TinySpec(
    "bench-big", seed=7, n_embd=2048, n_layer=8, n_head=16, n_head_kv=16, n_ff=5632, dtype="f16"
)
GGUF = "bench/bench-big-f16.gguf"


def ssh(spec: vmspec.VmSpec, command: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    result = machine.client_run(
        ["ssh", "-i", KEY, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={paths.local_vms() / 'known_hosts'}",
         f"{spec.admin_user}@{spec.network.ip}", f"sudo -n bash -c {shlex.quote(command)}"],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"{spec.name}: {command!r} failed: {result.stderr.strip()[-500:]}")
    return result


def drop_caches(*specs: vmspec.VmSpec) -> None:
    """Cold: the page caches of the given VMs and of this machine (the VM disks' host)."""
    for spec in specs:
        ssh(spec, "sync; echo 3 > /proc/sys/vm/drop_caches")
    subprocess.run(["bash", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)


def timed(spec: vmspec.VmSpec, command: str) -> float:
    """Seconds `command` takes on the VM, measured there."""
    out = ssh(spec, f"s=$(date +%s.%N); {command} >/dev/null; e=$(date +%s.%N); echo $s $e")
    start, end = (float(x) for x in out.stdout.split()[-2:])
    return end - start


def provision(cat: Path) -> None:
    run = subprocess.run([INVOKE, "provision", "-i", INVENTORY, "--catalog", str(cat)], cwd=REPO,
                         capture_output=True, text=True, check=False)  # fmt: skip
    if run.returncode != 0:
        raise SystemExit(f"provision failed:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}")


def main() -> int:
    keep = "--keep" in sys.argv
    # Steps 3 and 5 only (the downtime goal), on the bench models a --keep run left installed.
    downtime_only = "--downtime" in sys.argv
    runs = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 3
    vm = vmspec.from_inventory(INVENTORY)[0]
    nas = vmspec.from_inventory(INVENTORY, only="llamavm-nas")[0]
    base = catalog.load(TESTBED_CATALOG)
    share = Path(base.settings.controller_share_path or paths.models())
    big = share / GGUF
    if not big.exists():
        print(f"writing {big} ...", flush=True)
        tinymodel.write(BIG, big)
    size = big.stat().st_size
    data = yaml.safe_load(TESTBED_CATALOG.read_text())
    common = {"gguf": GGUF, "ctx_size": 512, "parallel": 1, "health_timeout_s": 1800}
    data["models"] += [
        {"name": "bench-share", "port": 8031, "load": "share", **common},
        {"name": "bench-stage", "port": 8032, "load": "stage", **common},
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cat = Path(tmp) / "models.bench.yaml"
        cat.write_text(yaml.safe_dump(data, sort_keys=False))
        if not downtime_only:
            print("provisioning the VMs with the bench models (seeds the NFS export)", flush=True)
            provision(cat)
        path = f"{base.settings.share_path}/{GGUF}"
        unit = f"{catalog.UNIT_PREFIX}bench-share.service"
        ssh(vm, "llamavm-switch stop")
        raws, colds, warms, stageds, switches = [], [], [], [], []
        for _ in range(0 if downtime_only else runs):
            # 1. the physical baseline
            drop_caches(vm, nas)
            raws.append(timed(vm, f"dd if={path} of=/dev/null bs=4M"))
            # 2. a load straight from NFS, cold
            drop_caches(vm, nas)
            colds.append(timed(vm, f"systemctl start {unit}"))
            ssh(vm, f"systemctl stop {unit}")
        for _ in range(runs):
            # 3. a warm-cache load in the switch's conditions: caches dropped, the file read
            # once into the page cache (as the pre-warm does), then the unit started
            drop_caches(vm, nas)
            ssh(vm, f"cat {path} >/dev/null")
            warms.append(timed(vm, f"systemctl start {unit}"))
            ssh(vm, f"systemctl stop {unit}")
        # 4. the staged local copy (staged by a switch, loaded again with the VM cache cold)
        if not downtime_only:
            ssh(vm, "llamavm-switch switch bench-stage && llamavm-switch stop")
        for _ in range(0 if downtime_only else runs):
            drop_caches(vm)
            stageds.append(timed(vm, f"systemctl start {catalog.UNIT_PREFIX}bench-stage.service"))
            ssh(vm, f"systemctl stop {catalog.UNIT_PREFIX}bench-stage.service")
        # 5. a switch with pre-warm, from a serving model, everything cold
        for _ in range(runs):
            ssh(vm, "llamavm-switch switch qwen3-coder-30b")
            drop_caches(vm, nas)
            began = time.monotonic()
            answer = json.loads(ssh(vm, "llamavm-switch switch bench-share --json").stdout)
            answer["wall"] = time.monotonic() - began
            switches.append(answer)
        ssh(vm, "llamavm-switch switch qwen3-coder-30b")
        if not keep:
            provision(TESTBED_CATALOG)
    mib = size / 2**20
    warm = statistics.median(warms)
    raw, cold, staged = (
        statistics.median(x) if x else float("nan") for x in (raws, colds, stageds)
    )
    rate = size / raw

    def spread(values: list[float]) -> str:
        return " / ".join(f"{v:.1f}" for v in values)

    print(f"GGUF: {GGUF}, {size / 2**30:.2f} GiB; model VM {vm.vcpus} vCPU / {vm.memory_mib} MiB; "
          f"medians of {runs} (every run in brackets)")  # fmt: skip
    if raws:
        print(f"1. raw read over NFS, cold (baseline)     {raw:7.2f} s  {mib / raw:7.1f} MiB/s  "
              f"1.00x  [{spread(raws)}]")  # fmt: skip
    for label, seconds, every in (
        ("2. load from NFS, cold", cold, colds),
        ("3. load from NFS, warm (page cache)", warm, warms),
        ("4. load from the staged local copy", staged, stageds),
    ):
        if not every:
            continue
        if not raws:
            print(f"{label:<40} {seconds:7.2f} s  {mib / seconds:7.1f} MiB/s  [{spread(every)}]")
            continue
        print(
            f"{label:<40} {seconds:7.2f} s  {mib / seconds:7.1f} MiB/s  "
            f"{(size / seconds) / rate:4.2f}x of the raw rate  [{spread(every)}]"
        )
    downs = [float(a["downtime_seconds"]) for a in switches]
    down = statistics.median(downs)
    for answer in switches:
        fetch = answer.get("fetch") or {}
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in (answer.get("phases") or {}).items())
        print(
            f"5. switch qwen3-coder-30b -> bench-share, cold: pre-warm "
            f"{fetch.get('seconds', 0):.2f} s ({fetch.get('read_bytes', 0) / 2**30:.2f} GiB "
            "while qwen3-coder-30b served), "
            f"downtime {float(answer['downtime_seconds']):.2f} s, switch "
            f"{answer['switch_seconds']:.2f} s (wall {answer['wall']:.2f} s); {phases}"
        )
    if raws:
        print(f"goal: cold NFS load rate / raw rate = {(size / cold) / rate:.2f} (>= 0.90)")
    print(f"goal: switch downtime / warm load   = {down / warm:.2f} (<= 1.20), "
          f"median downtime {down:.2f} s [{spread(downs)}]")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
