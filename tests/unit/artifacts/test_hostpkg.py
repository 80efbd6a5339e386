"""The host package: standard library only, one deterministic zipapp that stock Python runs."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamavm import REPO_ROOT
from llamavm.artifacts import hostpkg

#: The control service alone uses Debian packages (its role installs them); nothing else on the
#: host may need them, so it is imported only by the `control` command.
DEBIAN_ONLY = {
    "control.py": {"fastapi", "httpx", "uvicorn"},
    "routing.py": {"fastapi", "httpx"},
    "idle.py": {"fastapi", "httpx"},
    "relay.py": {"fastapi", "httpx"},
    "auth.py": {"fastapi"},
    "upstream.py": {"httpx"},
}
#: The control service's modules, as other host modules would name them in an import.
CONTROL_SERVICE = {name.removesuffix(".py") for name in DEBIAN_ONLY}


def test_the_host_package_imports_only_the_standard_library() -> None:
    for path in sorted((REPO_ROOT / "llamavm" / "host").glob("*.py")):
        allowed = set(sys.stdlib_module_names) | {"llamavm"} | DEBIAN_ONLY.get(path.name, set())
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level: nothing here may pull the control service in
            if isinstance(node, ast.ImportFrom) and node.module == "llamavm.host":
                assert "control" not in [a.name for a in node.names], path.name
            if isinstance(node, ast.ImportFrom) and node.module == "llamavm.host.control":
                raise AssertionError(f"{path.name} imports the control service at module level")
            if path.name in DEBIAN_ONLY or not isinstance(node, ast.ImportFrom):
                continue  # the control service's own modules import one another
            modules = {a.name for a in node.names} if node.module == "llamavm.host" else set()
            if (node.module or "").startswith("llamavm.host."):
                modules.add((node.module or "").removeprefix("llamavm.host."))
            assert not modules & CONTROL_SERVICE, f"{path.name} imports the control service"
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


def test_the_same_sources_give_the_same_file_in_every_process(tmp_path) -> None:
    """marshal's bytes differ between processes; the package's name and file must not (a
    provision's digest and Ansible's copy would see a new package every run)."""
    script = "import sys; from pathlib import Path; from llamavm.artifacts import hostpkg; " \
             "print(hostpkg.build(Path(sys.argv[1])))"  # fmt: skip
    paths, stamps = set(), set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)],
            capture_output=True, text=True, check=True, env=env, cwd=REPO_ROOT,
        )  # fmt: skip
        path = Path(out.stdout.strip())
        paths.add(path)
        stamps.add(path.stat().st_mtime_ns)
    assert len(paths) == 1 and len(stamps) == 1  # built once, found the second time
    assert paths.pop().name == f"llamavm-host-{hostpkg.source_key()[:16]}.pyz"


def test_a_source_change_is_a_new_package(tmp_path, monkeypatch) -> None:
    copy = tmp_path / "host"
    copy.mkdir()
    for path in hostpkg.SOURCE.glob("*.py"):
        (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(hostpkg, "SOURCE", copy)
    before = hostpkg.source_key()
    (copy / "status.py").write_text((copy / "status.py").read_text() + "\n# changed\n")
    assert hostpkg.source_key() != before
