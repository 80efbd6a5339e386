"""Switch time vs the bare llama-server start-to-healthy time, and vs llama.cpp router mode.

Run on a provisioned test bed (`invoke provision` first), as root:

    .venv/bin/python bench/switch.py [--runs 7]

Measured on the host in one SSH call, in the same run: the baseline (bare llama-server, started
by hand, until /health says 200), `llamavm-switch switch` between the two catalog models (stop
old, checks, start new, health gate, /props and one-token verification), the control service's
API switch (POST /switch), a routed request that names the other model (swap + 1 token through
/v1/chat/completions), and llama.cpp's own router mode (`--models-max 1`, swap + 1 token). Then
`invoke switch` end to end from the controller, through the control API (its default) and over
SSH (LLAMAVM_SWITCH_VIA=ssh), interleaved with router mode's swaps: a router-mode server is
left up on the host meanwhile (idle between its swaps, as the model service is between
switches), and each round times one swap of it on the host, then each `invoke switch`. This
machine's speed drifts by tens of percent within minutes; the ratio of `invoke switch` to router
mode is taken from the interleaved rounds, where both see the same machine. Prints medians and
ratios against the baseline and against router mode (goals: the API switch and the routed swap
within 1.2x of router mode, `invoke switch` within 1.3x).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from llamavm import REPO_ROOT
from llamavm.host.contract import CONTRACT_PATH
from llamavm.testbed import config, machine

INVOKE = REPO_ROOT / ".venv" / "bin" / "invoke"


def on_this_host(script: str) -> str:
    """A host script with the contract's path filled in."""
    return script.replace("@CONTRACT@", str(CONTRACT_PATH))


HOST_SCRIPT = r"""
import json, os, statistics, subprocess, sys, time, urllib.request

RUNS = int(sys.argv[1])
contract = json.load(open("@CONTRACT@"))
a, b = contract["models"][0], contract["models"][1]
server = contract["paths"]["llama_server"]
switch_tool = contract["paths"]["switch"]


def healthy(port, timeout=60, body=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/health")
            with urllib.request.urlopen(req, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.01)
    raise SystemExit(f"port {port} never became healthy")


def post(port, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()


def bare(model, port=8097):
    args = [server, "--model", model["gguf"], "--host", "127.0.0.1",
            "--port", str(port), "--ctx-size", str(model["ctx_size"]),
            "--parallel", str(model["parallel"]), "--fit", "off"]
    t0 = time.monotonic()
    proc = subprocess.Popen(["runuser", "-u", "llama", "--", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    healthy(port)
    dt = time.monotonic() - t0
    proc.terminate(); proc.wait()
    return dt


def switch(model):
    t0 = time.monotonic()
    out = subprocess.run([switch_tool, "switch", model["name"], "--json"],
                         capture_output=True, text=True, check=True)
    return time.monotonic() - t0, json.loads(out.stdout)


CONTROL = contract.get("control") or {}
HEADERS = {"Content-Type": "application/json"}
if contract["api_key"]["policy"] == "required":
    HEADERS["Authorization"] = "Bearer " + open(contract["api_key"]["file"]).read().strip()


def control(path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{CONTROL['port']}{path}", data=json.dumps(body).encode(),
        headers=HEADERS)
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=300) as r:
        answer = json.loads(r.read())
    return time.monotonic() - t0, answer


def router(port=8095):
    import tempfile
    d = tempfile.mkdtemp()
    for m in (a, b):
        os.symlink(m["gguf"], f"{d}/{m['name']}.gguf")
    proc = subprocess.Popen([server, "--models-dir", d, "--models-max", "1", "--host",
                             "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    healthy(port)
    times = []
    hi = [{"role": "user", "content": "hi"}]
    post(port, {"model": a["name"], "messages": hi, "max_tokens": 1})
    for i in range(RUNS):
        m = b if i % 2 == 0 else a
        t0 = time.monotonic()
        post(port, {"model": m["name"], "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 1})
        times.append(time.monotonic() - t0)
    proc.terminate(); proc.wait()
    return times


switch(a)
bare_times = [bare(b if i % 2 == 0 else a) for i in range(RUNS)]
switch_wall, switch_load = [], []
for i in range(RUNS):
    dt, answer = switch(b if i % 2 == 0 else a)
    switch_wall.append(dt)
    switch_load.append(answer["load_seconds"])
api_times, routed_times = [], []
if CONTROL.get("enabled"):
    switch(a)
    for i in range(RUNS):
        api_times.append(control("/switch", {"model": (b if i % 2 == 0 else a)["name"]})[0])
    if CONTROL.get("routing"):
        switch(a)
        hi = [{"role": "user", "content": "hi"}]
        for i in range(RUNS):
            m = b if i % 2 == 0 else a
            routed_times.append(
                control("/v1/chat/completions",
                        {"model": m["name"], "messages": hi, "max_tokens": 1})[0])
try:
    router_times = router()
except Exception as exc:  # router mode missing from this build
    router_times = []
    print(f"router mode failed: {exc}", file=sys.stderr)
switch(a)
print(json.dumps({"bare": bare_times, "switch": switch_wall, "switch_load": switch_load,
                  "api": api_times, "routed": routed_times, "router": router_times,
                  "models": [a["name"], b["name"]]}))
"""


#: Router mode kept up on the host while the controller's `invoke switch` rounds run: started
#: once (ROUTER_UP), one timed swap per round (ROUTER_SWAP, timed on the host, so SSH is not in
#: it), stopped at the end (ROUTER_DOWN).
ROUTER_PORT = 8095
ROUTER_PID = "/run/llamavm-bench-router.pid"
ROUTER_UP = r"""
import json, os, subprocess, sys, tempfile, time, urllib.request
contract = json.load(open("@CONTRACT@"))
d = tempfile.mkdtemp()
for m in contract["models"][:2]:
    os.symlink(m["gguf"], f"{d}/{m['name']}.gguf")
proc = subprocess.Popen([contract["paths"]["llama_server"], "--models-dir", d, "--models-max",
                         "1", "--host", "127.0.0.1", "--port", sys.argv[1]],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        start_new_session=True)
open(sys.argv[2], "w").write(str(proc.pid))
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1) as r:
            if r.status == 200:
                break
    except OSError:
        if time.monotonic() > deadline:
            raise SystemExit("router mode never became healthy")
        time.sleep(0.05)
"""
ROUTER_SWAP = r"""
import json, sys, time, urllib.request
body = {"model": sys.argv[2], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/chat/completions",
                             data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
t0 = time.monotonic()
with urllib.request.urlopen(req, timeout=120) as r:
    r.read()
print(time.monotonic() - t0)
"""


def on_host(script: str, *args: str) -> str:
    cfg, paths = config.load_config(), config.Paths.from_env()
    remote = shlex.join(["sudo", "-n", "python3", "-", *args])
    done = subprocess.run(
        [*machine.ssh_base_command(cfg, paths), remote],
        input=script, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"on the host: {done.stderr.strip()[-500:]}")
    return done.stdout


def router_down() -> None:
    on_host(
        "import os, signal, sys\n"
        "try:\n    os.killpg(int(open(sys.argv[1]).read()), signal.SIGTERM)\n"
        "except (OSError, ValueError):\n    pass\n",
        ROUTER_PID,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    data = json.loads(on_host(on_this_host(HOST_SCRIPT), str(args.runs)).strip().splitlines()[-1])

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2] if ordered else float("nan")

    # invoke switch end to end, from the controller: through the control API (the default
    # where the host has one) and over SSH (LLAMAVM_SWITCH_VIA=ssh), interleaved.
    invoke_times: dict[str, list[float]] = {"api": [], "ssh": []}
    router_rounds: list[float] = []
    swaps = 0  # each timed run switches to the model that is not serving: a real swap
    subprocess.run([str(INVOKE), "switch", "--model", data["models"][0]], capture_output=True)
    on_host(on_this_host(ROUTER_UP), str(ROUTER_PORT), ROUTER_PID)
    try:
        on_host(ROUTER_SWAP, str(ROUTER_PORT), data["models"][0])  # its first load, untimed
        for i in range(args.runs):
            model = data["models"][(i + 1) % 2]
            router_rounds.append(float(on_host(ROUTER_SWAP, str(ROUTER_PORT), model)))
            if invoke_rounds(invoke_times, data["models"], swaps) != 0:
                return 1
            swaps += len(invoke_times)
    finally:
        router_down()
    data["invoke"] = invoke_times
    data["router_interleaved"] = router_rounds

    bare, switch, router = median(data["bare"]), median(data["switch"]), median(data["router"])
    near = median(router_rounds)
    print(f"runs: {args.runs} each, medians, same host, same run")
    rows = [
        ("bare llama-server start -> /health 200", bare, router),
        ("llamavm-switch on the host", switch, router),
        ("control API POST /switch", median(data["api"]), router),
        ("routed request naming the other model", median(data["routed"]), router),
        ("llama.cpp router mode --models-max 1", router, router),
        ("router mode, interleaved with invoke switch", near, near),
        ("invoke switch (control API)", median(invoke_times["api"]), near),
        ("invoke switch (LLAMAVM_SWITCH_VIA=ssh)", median(invoke_times["ssh"]), near),
    ]
    for label, value, against in rows:
        print(
            f"{label:44s} {value * 1000:8.0f} ms   {value / bare:5.2f}x bare   "
            f"{value / against:5.2f}x router"
        )
    print(
        "goals: API switch and routed swap <= 1.2x router mode (the block before); "
        "invoke switch <= 1.3x (router mode interleaved with it)"
    )
    print(f"raw: {json.dumps(data)}")
    return 0


def invoke_rounds(times_by_via: dict[str, list[float]], models: list[str], swaps: int) -> int:
    """One `invoke switch` through each path, each to the model that is not serving."""
    for via, times in times_by_via.items():
        swaps += 1
        began = time.monotonic()
        done = subprocess.run(
            [str(INVOKE), "switch", "--model", models[swaps % 2]],
            capture_output=True, text=True, check=False,
            env={**os.environ, "LLAMAVM_SWITCH_VIA": via},
        )  # fmt: skip
        if done.returncode != 0 or "already serving" in done.stdout:
            print(done.stdout + done.stderr, file=sys.stderr)
            return 1
        times.append(time.monotonic() - began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
