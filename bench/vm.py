"""The embedded VM from nothing to a model answering, each step timed, in one run.

Run as root on this machine (the VM runs under TCG here; KVM where usable):

    .venv/bin/python bench/vm.py

Destroys the embedded VM (inventories/local-vm) with its disk, then times `invoke provision -i
local-vm` while a watcher on the LAN client records when the VM first answers SSH, when
cloud-init reports done, and when the model answers /health. The baseline, in the same run:
the nspawn test bed's boot (down/up, kept machine) — the container the VM stands beside.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llamavm import paths  # noqa: E402
from llamavm.inputs import catalog  # noqa: E402
from llamavm.platforms.vm import vmspec  # noqa: E402
from llamavm.testbed import machine  # noqa: E402

INVOKE = str(Path(sys.executable).parent / "invoke")
INVENTORY = "local-vm"
KEY = str(paths.local_vms() / "id_ed25519")


def client(*argv: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return machine.client_run(list(argv), capture_output=True, text=True, timeout=timeout)


def main() -> int:
    spec = vmspec.from_inventory(INVENTORY)[0]
    model = catalog.load(REPO / "config" / "models.testbed.yaml").default
    ip = spec.network.ip
    # Baseline: the test bed's own boot, same machine, same run.
    machine.down()
    t0 = time.monotonic()
    machine.up()
    baseline = time.monotonic() - t0

    subprocess.run([INVOKE, "vm.destroy", "-i", INVENTORY, "--vm", spec.name, "--purge"],
                   cwd=REPO, capture_output=True, check=False)  # fmt: skip
    (paths.local_vms() / "known_hosts").unlink(missing_ok=True)
    marks: dict[str, float] = {}
    done = threading.Event()
    t0 = time.monotonic()

    def watch() -> None:
        while not done.is_set():
            now = time.monotonic() - t0
            if "ssh" not in marks:
                probe = client("bash", "-c", f"exec 3<>/dev/tcp/{ip}/22", timeout=5)
                if probe.returncode == 0:
                    marks["ssh"] = now
            elif "cloud-init" not in marks:
                status = client(
                    "ssh", "-i", KEY, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    f"{spec.admin_user}@{ip}", "cloud-init status", timeout=30,
                )  # fmt: skip
                if "status: done" in status.stdout:
                    marks["cloud-init"] = now
            elif "model" not in marks:
                health = client(
                    "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
                    f"http://{ip}:{model.port}/health",
                )  # fmt: skip
                if health.stdout == "200":
                    marks["model"] = now
            time.sleep(0.5)

    watcher = threading.Thread(target=watch)
    watcher.start()
    run = subprocess.run([INVOKE, "provision", "-i", INVENTORY], cwd=REPO,
                         capture_output=True, text=True, check=False)  # fmt: skip
    total = time.monotonic() - t0
    time.sleep(2)
    done.set()
    watcher.join()
    if run.returncode != 0:
        print(run.stdout[-3000:], run.stderr, file=sys.stderr)
        return 1
    print(f"baseline: nspawn test bed boot (kept machine)   {baseline:7.1f} s   1.0x")
    previous = 0.0
    for step in ("ssh", "cloud-init", "model"):
        at = marks.get(step)
        if at is None:
            print(f"{step:>10}: not seen")
            continue
        print(f"{step:>10}: at {at:7.1f} s (+{at - previous:6.1f} s)   {at / baseline:6.1f}x")
        previous = at
    print(
        f"provision -i local-vm (create to converged)   {total:7.1f} s   {total / baseline:6.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
