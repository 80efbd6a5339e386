"""A Compose switch end to end against the systemd test bed's, and against a bare
`docker compose stop` / `up` of the same two services (issue 36's goals: ≤ 1.3x and ≤ 1.5x).

Run as root on a provisioned test bed (`invoke provision` first); the engine is started here
(Debian's docker.io on its own socket, as the Compose tests do) and the project provisioned
(`invoke provision -i local-compose`: its first build takes minutes):

    .venv/bin/python bench/compose.py [--rounds 5]

Each round, interleaved so all three see the same machine: `invoke switch -i local-compose`
to the other model (the host transaction in the project's switchd container: checks, stop,
start, load watch, answers), then the bare engine's way back (stop that container, `up -d` the
first one, wait for its /health; switchd paused meanwhile), then `invoke switch` on the test
bed to the other model and back (the second one timed too). Prints each median and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.request

from llamavm import REPO_ROOT
from llamavm.testbed import docker

INVOKE = REPO_ROOT / ".venv" / "bin" / "invoke"
INVENTORY, ADDRESS = docker.INVENTORY, docker.ADDRESS


def invoke(*args: str) -> float:
    began = time.monotonic()
    done = subprocess.run([str(INVOKE), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=False)  # fmt: skip
    took = time.monotonic() - began
    if done.returncode != 0:
        sys.exit(f"invoke {' '.join(args)} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return took


def healthy(port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{ADDRESS}:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit(f"port {port} not healthy after {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    if os.geteuid() != 0:
        sys.exit("run as root: the engine and the test bed need it")
    docker.install()
    proc = docker.start()
    try:
        engine, cat = docker.project(INVENTORY, ADDRESS)
        first, other = cat.big[0], cat.big[1]
        invoke("provision", "-i", INVENTORY)
        invoke("switch", "-i", INVENTORY, "--model", first.name)
        invoke("switch", "--model", first.name)
        times: dict[str, list[float]] = {"compose": [], "bare": [], "systemd": []}
        for n in range(rounds):
            times["compose"].append(invoke("switch", "-i", INVENTORY, "--model", other.name))
            # switchd would serve the chosen model again while none runs: it waits (paused,
            # untimed) while the engine's own way runs.
            docker.docker("pause", "llamavm-switchd")
            began = time.monotonic()
            engine.compose([other.name], ["stop", other.name])
            engine.compose([first.name], ["up", "-d", "--no-build", first.name])
            healthy(first.port)
            times["bare"].append(time.monotonic() - began)
            docker.docker("unpause", "llamavm-switchd")
            times["systemd"].append(invoke("switch", "--model", other.name))
            times["systemd"].append(invoke("switch", "--model", first.name))
            print(f"round {n + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  flush=True)  # fmt: skip
        # Leave the project as provision does: its default serving through llamavm's switch.
        invoke("switch", "-i", INVENTORY, "--model", first.name)
        med = {k: statistics.median(v) for k, v in times.items()}
        print("medians: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
        ratio_s, ratio_b = med["compose"] / med["systemd"], med["compose"] / med["bare"]
        print(f"compose switch / systemd switch: {ratio_s:.2f}x (goal ≤ 1.3x)")
        print(f"compose switch / bare stop+up:   {ratio_b:.2f}x (goal ≤ 1.5x)")
    finally:
        docker.stop(proc)


if __name__ == "__main__":
    main()
