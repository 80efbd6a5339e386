"""The host package: standard library only, one deterministic zipapp that stock Python runs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from llamavm import REPO_ROOT, hostpkg

#: The control service alone uses Debian packages (its role installs them); nothing else on the
#: host may need them, so it is imported only by the `control` command.
DEBIAN_ONLY = {"control.py": {"fastapi", "httpx", "uvicorn"}}


def test_the_host_package_imports_only_the_standard_library() -> None:
    for path in sorted((REPO_ROOT / "llamavm" / "host").glob("*.py")):
        allowed = set(sys.stdlib_module_names) | {"llamavm"} | DEBIAN_ONLY.get(path.name, set())
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level: nothing here may pull the control service in
            if isinstance(node, ast.ImportFrom) and node.module == "llamavm.host":
                assert "control" not in [a.name for a in node.names], path.name
            if isinstance(node, ast.ImportFrom) and node.module == "llamavm.host.control":
                raise AssertionError(f"{path.name} imports the control service at module level")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in allowed, f"{path.name} imports {name}"
                if top == "llamavm":
                    assert name.startswith("llamavm.host"), f"{path.name} imports {name}"


def test_the_zipapp_is_deterministic(tmp_path) -> None:
    one = hostpkg.build(tmp_path / "a")
    two = hostpkg.build(tmp_path / "b")
    assert one.read_bytes() == two.read_bytes()
    assert one.read_bytes().startswith(b"#!/usr/bin/python3 -I\n")
    assert one.name == two.name and one.stat().st_mode & 0o111


@pytest.mark.parametrize("python", ["/usr/bin/python3", sys.executable])
def test_stock_python_runs_it(tmp_path, python) -> None:
    if not Path(python).exists():
        pytest.skip(f"no {python}")
    pyz = hostpkg.build(tmp_path)
    run = subprocess.run([python, "-I", str(pyz), "--help"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "llamavm-switch" in run.stdout and "switch" in run.stdout


def test_without_a_contract_it_says_what_to_do(tmp_path) -> None:
    pyz = hostpkg.build(tmp_path)
    run = subprocess.run(
        [sys.executable, "-I", str(pyz), "status", "--json"], capture_output=True, text=True
    )
    assert run.returncode == 2, run.stderr
    assert "run 'invoke provision'" in run.stdout
    assert "Traceback" not in run.stderr
