"""First-run paths that a warm cache would hide: every CI run walks them from empty caches.

A fresh Debian 12 once failed the README's first command in the sdist extraction, which CI
never ran because its cache outlived every run. Here the controller's first-run steps run
into empty directories, on the stock Python the README's commands use.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

from llamavm.artifacts import source, tinymodel
from llamavm.testbed import config, rootfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap needs root")


def _walked_by_this_run(path: str) -> None:
    """Skip when `invoke test` walked this first-run path itself, from empty caches, before
    pytest (LLAMAVM_TEST_WALKED_COLD): its phase would have failed the run already."""
    if path in os.environ.get("LLAMAVM_TEST_WALKED_COLD", "").split(","):
        pytest.skip(f"this run's first provision built the {path} from an empty cache")


def test_the_suite_runs_on_the_stock_python_of_the_readme() -> None:
    """scripts/bootstrap makes the venv from /usr/bin/python3 (3.11.2 on Debian 12)."""
    if os.environ.get("LLAMAVM_PYTHON") or not Path("/usr/bin/python3").exists():
        pytest.skip("a different Python was chosen for the venv")
    assert Path(sys.executable).resolve() == Path("/usr/bin/python3").resolve()


def test_source_preparation_from_an_empty_cache(tmp_path) -> None:
    """pip download, extraction (no tarfile filter= on 3.11.2), npm UI build, tarball."""
    _walked_by_this_run("source")
    fresh = source.prepare(cache=tmp_path)
    warm = source.prepare()
    ui = "llama.cpp/tools/ui/dist/"
    with tarfile.open(fresh) as a, tarfile.open(warm) as b:
        names, cached = sorted(a.getnames()), sorted(b.getnames())
    # The source is the same file by file; the UI bundle's names carry build hashes.
    assert [n for n in names if not n.startswith(ui)] == [n for n in cached if not n.startswith(ui)]
    assert len([n for n in names if n.startswith(ui)]) == len(
        [n for n in cached if n.startswith(ui)]
    )
    assert "llama.cpp/CMakeLists.txt" in names
    assert f"{ui}index.html" in names


def test_tiny_and_canary_models_from_an_empty_cache(tmp_path) -> None:
    written = tinymodel.ensure_all(tmp_path / "models")
    assert all(p.stat().st_size > 1_000_000 for p in written)
    assert tinymodel.canary(tmp_path).is_file()


def test_test_bed_rootfs_from_an_empty_cache(tmp_path, monkeypatch) -> None:
    _walked_by_this_run("rootfs")
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLAMAVM_STATE", str(tmp_path / "state"))
    cfg, paths = config.load_config(), config.Paths.from_env()
    try:
        root, built = rootfs.ensure(cfg, paths)
        assert built
        assert (root / rootfs.COMPLETE_STAMP).is_file()
        assert (root / "etc" / "sudoers.d" / cfg.admin_user).is_file()
        assert not list((root / "etc" / "ssh").glob("ssh_host_*")), "host keys are per machine"
    finally:
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
