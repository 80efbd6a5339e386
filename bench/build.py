"""Benchmark the llama_cpp role: cold build vs ccache-warm rebuild vs no-op converge.

All three run in one session on this machine (``-c local``, scratch prefix and a fresh build
root, so the ccache starts empty) and are printed side by side as ratios to the cold build:

    python bench/build.py [--keep] [--json]

The ccache-warm rebuild changes a cmake flag that alters the build key but no compile command
(a new versioned install whose objects all come from ccache), which is what a flag flip or a
re-extracted source costs on a host that built before. Needs root (separate build user).
Takes about 5-6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from llamavm.artifacts import source, tinymodel  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def converge(scratch: Path, archive: Path, extra: dict[str, object]) -> tuple[float, str]:
    """Run the llama_cpp playbook locally; return (seconds, output)."""
    evars = {
        "llama_cpp_source_archive": str(archive),
        "llama_cpp_source_version": source.load_config().label,
        "llama_cpp_canary_model": str(tinymodel.canary()),
        "llama_cpp_prefix": str(scratch / "opt"),
        "llama_cpp_build_root": str(scratch / "build"),
        "llama_cpp_hosts": "localhost",
        "llama_cpp_builder_hosts": "localhost",
        "ansible_become_method": "ansible.builtin.su",
        "ansible_python_interpreter": sys.executable,
        **extra,
    }
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible" / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
    }
    argv = [
        str(VENV_BIN / "ansible-playbook"),
        "-c",
        "local",
        "-i",
        "localhost,",
        str(REPO_ROOT / "ansible" / "playbooks" / "llama_cpp.yml"),
        "-e",
        json.dumps(evars),
    ]
    t0 = time.monotonic()
    proc = subprocess.run(
        argv, cwd=REPO_ROOT / "ansible", env=env, capture_output=True, text=True, check=False
    )
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"converge failed:\n{proc.stdout[-4000:]}\n{proc.stderr}")
    return elapsed, proc.stdout


def changed(out: str) -> int:
    return sum(int(n) for n in re.findall(r"changed=(\d+)", out.split("PLAY RECAP")[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/build.py needs root (the role builds as a separate user)")

    archive = source.prepare()
    scratch = Path(tempfile.mkdtemp(prefix="lvm-bench-build-"))
    scratch.chmod(0o755)
    try:
        cold, out_cold = converge(scratch, archive, {})
        warm, out_warm = converge(
            scratch, archive, {"llama_cpp_cmake_extra_flags": {"LLAMA_FATAL_WARNINGS": "OFF"}}
        )
        noop, out_noop = converge(
            scratch, archive, {"llama_cpp_cmake_extra_flags": {"LLAMA_FATAL_WARNINGS": "OFF"}}
        )
        stats = subprocess.run(
            ["ccache", "--print-stats"],
            env={**os.environ, "CCACHE_DIR": str(scratch / "build/ccache")},
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    rows = [
        ("cold build (empty ccache)", cold, changed(out_cold)),
        ("ccache-warm rebuild (new key)", warm, changed(out_warm)),
        ("no-op converge", noop, changed(out_noop)),
    ]
    hits = dict(
        re.findall(r"^(direct_cache_hit|preprocessed_cache_hit|cache_miss)\t(\d+)", stats, re.M)
    )
    if args.json:
        print(
            json.dumps(
                {
                    "rows": [
                        {
                            "case": c,
                            "seconds": round(s, 1),
                            "changed": n,
                            "ratio_to_cold": round(s / cold, 3),
                        }
                        for c, s, n in rows
                    ],
                    "ccache": hits,
                },
                indent=2,
            )
        )
        return 0
    print(f"{'case':32} {'seconds':>8} {'x cold':>8} {'changed':>8}")
    for case, secs, n in rows:
        print(f"{case:32} {secs:8.1f} {secs / cold:8.3f} {n:8d}")
    print(f"ccache: {hits}")
    print(f"cold/warm speed-up: {cold / warm:.1f}x; cold/no-op: {cold / noop:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
