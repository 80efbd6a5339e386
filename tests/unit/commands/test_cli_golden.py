"""The commands as an operator sees them, held still: `invoke --list` and every task's
`--help` (flags, defaults, help text) against tests/unit/commands/golden/invoke.txt. Issue 35
moves the code behind them; this must pass unchanged from its first step to its last. A
deliberate change of a command: rewrite the file with LLAMAVM_UPDATE_GOLDEN=1 and say why in the
commit."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llamavm import REPO_ROOT

GOLDEN = Path(__file__).resolve().parent / "golden" / "invoke.txt"
INVOKE = Path(sys.executable).parent / "invoke"


def _run(*args: str) -> str:
    # No terminal: Invoke wraps at 80 columns, the same everywhere.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    done = subprocess.run(
        [str(INVOKE), *args], cwd=REPO_ROOT, capture_output=True, text=True, env=env,
        stdin=subprocess.DEVNULL, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def tasks(listing: str) -> list[str]:
    """The task names in `invoke --list`'s output."""
    lines = listing.split("Available tasks:", 1)[1].splitlines()
    return [line.split()[0] for line in lines if line.startswith("  ") and line[2] != " "]


def current() -> str:
    listing = _run("--list")
    with ThreadPoolExecutor(max_workers=4) as pool:
        helps = list(pool.map(lambda task: _run("--help", task), tasks(listing)))
    sections = [("invoke --list", listing)]
    sections += [(f"invoke --help {t}", h) for t, h in zip(tasks(listing), helps, strict=True)]
    return "".join(f"===== {title}\n{text.rstrip()}\n" for title, text in sections)


def test_every_command_its_flags_and_help_are_as_before() -> None:
    now = current()
    if os.environ.get("LLAMAVM_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(now)
    assert now == GOLDEN.read_text(), (
        "invoke --list or a task's --help changed (see the diff); if on purpose, rewrite "
        f"{GOLDEN.relative_to(REPO_ROOT)} with LLAMAVM_UPDATE_GOLDEN=1"
    )


def test_the_listing_is_read_whole() -> None:
    names = tasks(_run("--list"))
    assert {"provision", "switch", "status", "testbed.up", "compose.render"} <= set(names)
    assert len(names) == len(set(names)) >= 20
