"""Fixtures for the unit tests: no hosts, no root, no network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_invoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `invoke ARGS` from the repo root the way an operator does."""
    invoke = Path(sys.executable).parent / "invoke"
    return subprocess.run(
        [str(invoke), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.fixture
def invoke_cli():
    return run_invoke
