"""Unit tests of llamavm.source (no network, no npm, no hosts)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from llamavm import source
from llamavm.errors import LlamavmError


def _tree(root: Path) -> Path:
    tree = root / "llama.cpp"
    (tree / "src").mkdir(parents=True)
    (tree / "docs").mkdir()
    (tree / "tools" / "ui").mkdir(parents=True)
    (tree / "CMakeLists.txt").write_text("project(x)\n")
    (tree / "src" / "llama.cpp").write_text("int main() {}\n")
    (tree / "docs" / "big.md").write_text("x" * 1000)
    (tree / "tools" / "ui" / "package.json").write_text("{}\n")
    script = tree / "build.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o775)
    (tree / "link").symlink_to("CMakeLists.txt")
    return tree


def _dist(root: Path) -> Path:
    dist = root / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html></html>\n")
    return dist


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tarball_is_reproducible_across_mtimes(tmp_path: Path) -> None:
    tree, dist = _tree(tmp_path), _dist(tmp_path)
    one = source.write_tarball(tree, dist, tmp_path / "one.tar.gz", ["docs"])
    later = time.time() + 3600
    for dirpath, _, files in os.walk(tree):
        for f in files:
            os.utime(Path(dirpath) / f, (later, later), follow_symlinks=False)
    two = source.write_tarball(tree, dist, tmp_path / "two.tar.gz", ["docs"])
    assert _sha(one) == _sha(two)


def test_tarball_layout_modes_and_excludes(tmp_path: Path) -> None:
    tree, dist = _tree(tmp_path), _dist(tmp_path)
    out = source.write_tarball(tree, dist, tmp_path / "t.tar.gz", ["docs"])
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert "llama.cpp/CMakeLists.txt" in members
    assert "llama.cpp/tools/ui/dist/index.html" in members
    assert not any(n.startswith("llama.cpp/docs") for n in members)
    assert members["llama.cpp/build.sh"].mode == 0o755
    assert members["llama.cpp/src/llama.cpp"].mode == 0o644
    assert members["llama.cpp/link"].issym()
    assert {m.uid for m in members.values()} == {0}
    assert {m.mtime for m in members.values()} == {source.FIXED_MTIME}
    assert list(members) == sorted(members)


def test_tarball_replaces_a_stale_dist_in_the_tree(tmp_path: Path) -> None:
    tree, dist = _tree(tmp_path), _dist(tmp_path)
    stale = tree / "tools" / "ui" / "dist"
    stale.mkdir()
    (stale / "old.js").write_text("old")
    out = source.write_tarball(tree, dist, tmp_path / "t.tar.gz", [])
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert "llama.cpp/tools/ui/dist/old.js" not in names
    assert "llama.cpp/tools/ui/dist/index.html" in names


def test_load_config_reads_the_repo_pins() -> None:
    cfg = source.load_config()
    assert cfg.package == "llama-cpp-python"
    assert cfg.label == f"sdist-{cfg.version}"
    assert "docs" in cfg.ship_exclude


def test_load_config_rejects_a_bad_version(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("sdist: {version: '../x'}\n")
    with pytest.raises(LlamavmError, match=r"sdist\.version"):
        source.load_config(bad)


def test_load_config_missing_file_is_an_operator_error(tmp_path: Path) -> None:
    with pytest.raises(LlamavmError, match="cannot read"):
        source.load_config(tmp_path / "absent.yaml")


def test_prepare_without_ui_uses_cache_and_a_given_tree(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    out = source.prepare(cache=tmp_path / "cache", with_ui=False, tree=tree)
    assert out.is_file() and "noui" in out.name
    assert source.prepare(cache=tmp_path / "cache", with_ui=False, tree=tree) == out


def test_prepare_rejects_a_tree_without_cmakelists(tmp_path: Path) -> None:
    with pytest.raises(LlamavmError, match=r"not a llama\.cpp tree"):
        source.prepare(cache=tmp_path / "cache", with_ui=False, tree=tmp_path)


def test_cache_root_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAVM_CACHE", "/x/y")
    assert source.cache_root() == Path("/x/y")
    monkeypatch.delenv("LLAMAVM_CACHE")
    assert source.cache_root() == Path("/var/cache/llamavm")


def _tar_with(tmp_path: Path, *members: tarfile.TarInfo) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return path


@pytest.mark.parametrize(
    "member",
    [
        ("../escape.txt", tarfile.REGTYPE, ""),
        ("/abs.txt", tarfile.REGTYPE, ""),
        ("top/link", tarfile.SYMTYPE, "../../etc/passwd"),
        ("top/abslink", tarfile.SYMTYPE, "/etc/passwd"),
        ("top/hard", tarfile.LNKTYPE, "/etc/passwd"),
        ("top/dev", tarfile.CHRTYPE, ""),
    ],
    ids=["dotdot", "absolute", "symlink-out", "symlink-abs", "hardlink-abs", "device"],
)
def test_safe_extract_refuses_members_outside(tmp_path: Path, member: tuple) -> None:
    name, kind, link = member
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 1 if kind == tarfile.REGTYPE else 0
    dest = tmp_path / "dest"
    dest.mkdir()
    with tarfile.open(_tar_with(tmp_path, info)) as tar, pytest.raises(tarfile.TarError):
        source.safe_extract(tar, dest)
    assert list(dest.iterdir()) == []


def test_safe_extract_keeps_a_normal_tree(tmp_path: Path) -> None:
    tree, dist = _tree(tmp_path), _dist(tmp_path)
    out = source.write_tarball(tree, dist, tmp_path / "t.tar.gz", ["docs"])
    dest = tmp_path / "dest"
    dest.mkdir()
    with tarfile.open(out) as tar:
        source.safe_extract(tar, dest)
    assert (dest / "llama.cpp" / "CMakeLists.txt").read_text() == "project(x)\n"
    assert (dest / "llama.cpp" / "link").is_symlink()
    assert os.access(dest / "llama.cpp" / "build.sh", os.X_OK)


def test_is_cold_until_the_sdist_or_a_ui_is_in_the_cache(tmp_path: Path) -> None:
    cfg = source.load_config()
    assert source.is_cold(cache=tmp_path)
    (tmp_path / "ui" / f"{cfg.version}-0123456789abcdef").mkdir(parents=True)
    assert not source.is_cold(cache=tmp_path)
    (tmp_path / "ui").rename(tmp_path / "ui.old")
    assert source.is_cold(cache=tmp_path)
    (tmp_path / "src" / f"llama_cpp_python-{cfg.version}").mkdir(parents=True)
    assert not source.is_cold(cache=tmp_path)


def test_fetched_tree_reuses_an_extracted_sdist_without_fetching(tmp_path: Path) -> None:
    cfg = source.load_config()
    top = tmp_path / "src" / f"llama_cpp_python-{cfg.version}"
    tree = _tree(top / "vendor")
    # No sdist archive in the cache: a fetch would run pip (and fail without the network).
    assert source.fetched_tree(cache=tmp_path) == tree
