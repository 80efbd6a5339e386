"""A long conversation's prompt after a detour to another model: with the saved slots restored,
against its first time, and against the same detour with the saved slots removed.

Run on a provisioned test bed (`invoke provision` first), as root:

    .venv/bin/python -u bench/prompt_cache.py [--runs 3] [--ctx 4096] [--words N]

The test bed's tiny models process a short prompt in about the time of one request's fixed
cost, so the run first provisions the catalog with the default model at `--ctx` tokens in one
slot (a prompt of 0.6 of that, by default; the tiny models were trained on 4096), and
provisions the catalog back at the end.
Each run, from the LAN client's namespace straight to the default model's port: a long prompt
(a fresh one per run, so nothing is cached before) — its prompt processing as llama-server's
own `timings` report it (prompt_n tokens, prompt_ms); `invoke switch` to the other model and
back (its slots saved before the stop, restored after the start); the same prompt again. Then
the same detour once more with the saved slot files removed on the host before the way back
(the baseline without the cache). Prints medians and ratios against the first time (goal:
≤ 0.2x with the cache) and whether the answers matched.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from llamavm import REPO_ROOT
from llamavm.artifacts import contract
from llamavm.inputs import catalog
from llamavm.inputs import inventory as inventory_mod
from llamavm.ops import remote
from llamavm.testbed import machine

INVOKE = REPO_ROOT / ".venv" / "bin" / "invoke"
TEXT = (
    "The quick brown fox jumps over the lazy dog while the operator reads the build log line by "
    "line and notes each warning in the margin of a long report about caches. "
)


def chat(address: str, prompt: str) -> tuple[dict, str]:
    """(llama-server's timings, the answer) of one chat from the LAN client."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
            "temperature": 0, "cache_prompt": True}  # fmt: skip
    answer = machine.client_run(
        ["curl", "-sS", "--max-time", "120", "-H", "Content-Type: application/json",
         "-d", json.dumps(body), f"{address}/v1/chat/completions"],
        capture_output=True, text=True,
    )  # fmt: skip
    if answer.returncode != 0:
        sys.exit(f"chat failed: {answer.stderr}")
    reply = json.loads(answer.stdout)
    return reply["timings"], reply["choices"][0]["message"]["content"]


def provision() -> None:
    done = subprocess.run([str(INVOKE), "provision"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"invoke provision failed:\n{done.stdout[-3000:]}{done.stderr}")


def switch(name: str) -> None:
    done = subprocess.run([str(INVOKE), "switch", "--model", name], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"invoke switch --model {name} failed:\n{done.stdout}{done.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=4096, help="0: the catalog as it is")
    parser.add_argument("--words", type=int, default=0, help="default: 0.6 of the context")
    args = parser.parse_args()
    path = catalog.catalog_path(None, inventory_mod.resolve(None).catalog)
    if not args.ctx:
        return measure(args, catalog.load(path))
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for entry in data["models"]:
        if entry["name"] == data["settings"]["default_model"]:
            entry["ctx_size"], entry["parallel"] = args.ctx, 1
    with tempfile.TemporaryDirectory(prefix="llamavm-bench-") as tmp:
        variant = Path(tmp) / "models.yaml"
        variant.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        os.environ[catalog.CATALOG_ENV] = str(variant)
        try:
            provision()
            return measure(args, catalog.load(variant))
        finally:
            del os.environ[catalog.CATALOG_ENV]
            provision()


def measure(args: argparse.Namespace, cat: catalog.Catalog) -> int:
    words = args.words or int(cat.default.ctx_size // cat.default.parallel * 0.6)
    model = cat.default
    other = next(m for m in cat.models if m.name != model.name)
    info = machine.up()
    host = remote.hosts(inventory_mod.resolve(None).path)[0]
    address = f"http://{info.host_address}:{model.port}"
    slot_dir = f"{contract.load_host_config().slot_dir}/{model.name}"
    switch(model.name)
    first, again, cold = [], [], []
    same = True
    for run in range(args.runs + 1):
        vocabulary = TEXT.split()
        prompt = f"Run {run}. " + " ".join(vocabulary[i % len(vocabulary)] for i in range(words))
        t1, a1 = chat(address, prompt)
        switch(other.name)
        if run == args.runs:  # the baseline: the same detour, the saved slots removed
            removed = remote.run(host, ["bash", "-c", f"rm -f {slot_dir}/slot-*.bin"], stream=False)
            if removed.returncode != 0:
                sys.exit(f"could not remove the saved slots: {removed.stderr}")
        switch(model.name)
        t2, a2 = chat(address, prompt)
        if run == args.runs:
            cold.append(t2)
        else:
            first.append(t1)
            again.append(t2)
            same = same and a1 == a2
        print(
            f"run {run}: first {t1['prompt_n']} tokens {t1['prompt_ms']:.1f} ms, after the "
            f"detour {t2['prompt_n']} tokens {t2['prompt_ms']:.1f} ms",
            flush=True,
        )

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    base = median(first, "prompt_ms")
    print(f"\n{model.name}, ctx {model.ctx_size}, {words}-word prompt, {args.runs} runs, medians")
    print("| case | prompt tokens processed | prompt ms | vs first |")
    print("| --- | --- | --- | --- |")
    rows = [
        ("first time", first),
        ("after a switch away and back, slots restored", again),
        ("the same, saved slots removed (baseline, 1 run)", cold),
    ]
    for label, runs in rows:
        ms = median(runs, "prompt_ms")
        print(f"| {label} | {median(runs, 'prompt_n'):.0f} | {ms:.1f} | {ms / base:.2f}x |")
    print(f"answers unchanged: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
