"""Unit tests of llamavm.artifacts.source (no network, no npm, no hosts)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from llamavm.artifacts import source
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


def _pins(tmp_path: Path, patches: str = "") -> Path:
    """A pins file like the repository's, with these patches (YAML list items) or none."""
    pins = tmp_path / "llama_cpp.yaml"
    pins.write_text(
        "sdist: {version: '0.3.36'}\nship_exclude: [docs]\n"
        + (f"patches:\n{patches}" if patches else "")
    )
    return pins


PATCH = """\
  - name: say-hello
    file: src/llama.cpp
    find: "int main() {}"
    replace: "int main() { return 42; }"
"""


def test_prepare_without_ui_uses_cache_and_a_given_tree(tmp_path: Path) -> None:
    tree, pins = _tree(tmp_path), _pins(tmp_path)
    out = source.prepare(pins, cache=tmp_path / "cache", with_ui=False, tree=tree)
    assert out.is_file() and "noui" in out.name
    assert source.prepare(pins, cache=tmp_path / "cache", with_ui=False, tree=tree) == out


def test_patches_change_the_shipped_file_not_the_tree(tmp_path: Path) -> None:
    tree, dist = _tree(tmp_path), _dist(tmp_path)
    cfg = source.load_config(_pins(tmp_path, PATCH))
    out = source.write_tarball(tree, dist, tmp_path / "t.tar.gz", ["docs"], cfg.patches)
    with tarfile.open(out) as tar:
        member = tar.getmember("llama.cpp/src/llama.cpp")
        shipped = tar.extractfile(member).read()  # type: ignore[union-attr]
        untouched = tar.extractfile("llama.cpp/CMakeLists.txt").read()  # type: ignore[union-attr]
    assert shipped == b"int main() { return 42; }\n"
    assert member.size == len(shipped)
    assert untouched == b"project(x)\n"
    assert (tree / "src" / "llama.cpp").read_text() == "int main() {}\n"


def test_patches_name_the_tarball(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    plain = source.prepare(_pins(tmp_path), cache=tmp_path / "c", with_ui=False, tree=tree)
    patched = source.prepare(_pins(tmp_path, PATCH), cache=tmp_path / "c", with_ui=False, tree=tree)
    assert plain != patched and plain.is_file() and patched.is_file()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("int main() {}\nint main() {}\n", r"'say-hello'.*occurs 2 times in src/llama\.cpp"),
        ("int other() {}\n", r"'say-hello'.*occurs 0 times.*update or drop the patch"),
    ],
)
def test_a_patch_that_does_not_match_once_stops_prepare(
    tmp_path: Path, text: str, error: str
) -> None:
    tree, pins = _tree(tmp_path), _pins(tmp_path, PATCH)
    (tree / "src" / "llama.cpp").write_text(text)
    with pytest.raises(LlamavmError, match=error):
        source.prepare(pins, cache=tmp_path / "cache", with_ui=False, tree=tree)


def test_a_patch_of_a_missing_or_unshipped_file_stops_prepare(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    gone = _pins(tmp_path, PATCH.replace("src/llama.cpp", "src/gone.cpp"))
    with pytest.raises(LlamavmError, match=r"'say-hello': cannot read src/gone\.cpp"):
        source.prepare(gone, cache=tmp_path / "cache", with_ui=False, tree=tree)
    unshipped = _pins(tmp_path, PATCH.replace("src/llama.cpp", "docs/big.md"))
    with pytest.raises(LlamavmError, match=r"docs/big\.md is not shipped"):
        source.prepare(unshipped, cache=tmp_path / "cache", with_ui=False, tree=tree)


@pytest.mark.parametrize(
    ("patches", "error"),
    [
        ("  - {name: x, file: a.cpp, find: y}\n", r"patches\[0\]: needs the strings"),
        ("  - {name: x, file: ../a.cpp, find: y, replace: z}\n", r"patches\[0\]\.file"),
        ("  - {name: x, file: /etc/passwd, find: y, replace: z}\n", r"patches\[0\]\.file"),
        ("  just-a-string\n", r"patches must be a list"),
    ],
)
def test_load_config_rejects_malformed_patches(tmp_path: Path, patches: str, error: str) -> None:
    with pytest.raises(LlamavmError, match=error):
        source.load_config(_pins(tmp_path, patches))


def test_the_repository_patches_apply_to_the_pinned_tree() -> None:
    cfg = source.load_config()
    if source.is_cold():
        pytest.skip("the pinned source is not fetched yet (invoke provision fetches it)")
    tree = source.fetched_tree()  # extracted already: no download
    patched = source.patched_files(tree, cfg.patches, cfg.ship_exclude, cfg.path)
    assert len(patched) == len({p.file for p in cfg.patches}) > 0


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
