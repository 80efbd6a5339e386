"""Controller-side preparation of the llama.cpp source shipped to hosts.

Hosts are offline, so everything they need to build llama-server comes from the
controller in one file:

1. fetch the pinned llama-cpp-python sdist once with pip (its ``vendor/llama.cpp`` is a
   full llama.cpp tree) and extract it, both cached under ``${LLAMAVM_CACHE}``;
2. build the web UI once per source version with ``npm ci`` + ``npm run build`` in a cached
   copy of ``tools/ui`` (hosts then embed the prebuilt ``tools/ui/dist``, never npm, never
   a download);
3. write a deterministic tarball of the tree with the UI dist inside (same bytes for the same
   inputs, so Ansible's copy is idempotent and the role's build key is stable), with the
   source patches of ``config/llama_cpp.yaml`` applied to the files they name (the cached
   tree stays as the sdist shipped it).

The integrator passes the result to ``ansible-playbook`` as the extra var
``llama_cpp_source_archive`` (see :data:`EXTRA_VAR`)::

    archive = prepare()
    ... ansible-playbook ... -e llama_cpp_source_archive=<archive>

CLI: ``python -m llamavm.artifacts.source prepare`` prints the tarball path.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from llamavm import REPO_ROOT, paths, proc
from llamavm.errors import LlamavmError

#: The extra var the role reads the tarball path from.
EXTRA_VAR = "llama_cpp_source_archive"
#: Companion extra var: a human label of the source (part of the install directory name).
EXTRA_VAR_VERSION = "llama_cpp_source_version"

DEFAULT_CONFIG = REPO_ROOT / "config" / "llama_cpp.yaml"
#: Every member of the shipped tarball gets this mtime (2020-01-01), so the bytes depend on
#: content only. Make's staleness checks don't care: hosts extract into a fresh directory
#: whenever the tarball changes.
FIXED_MTIME = 1577836800
#: Bump when the layout of the shipped tarball changes, to invalidate cached tarballs.
TARBALL_FORMAT = "1"
_UI_REQUIRED = ("index.html",)


@dataclass(frozen=True)
class Patch:
    """One change llamavm makes to the pinned source: `find` (which must occur exactly once in
    `file`) becomes `replace`."""

    name: str
    file: str
    find: str
    replace: str

    def apply(self, text: str, where: Path) -> str:
        found = text.count(self.find)
        if found != 1:
            raise LlamavmError(
                f"{where}: patch {self.name!r}: its 'find' text occurs {found} times in "
                f"{self.file} (once expected) — update or drop the patch for this source pin"
            )
        return text.replace(self.find, self.replace)


@dataclass(frozen=True)
class SourceConfig:
    """The pins read from config/llama_cpp.yaml."""

    package: str
    version: str
    tree: str
    ui_build: bool
    ui_timeout_s: int
    ship_exclude: tuple[str, ...]
    patches: tuple[Patch, ...] = ()
    #: The pins file these settings came from (named in errors).
    path: Path = DEFAULT_CONFIG

    @property
    def patch_id(self) -> str:
        """A short digest of the patches ("" with none): part of the tarball's name."""
        if not self.patches:
            return ""
        text = "\0".join(f"{p.name}\0{p.file}\0{p.find}\0{p.replace}" for p in self.patches)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def label(self) -> str:
        """Human label of this source, e.g. ``sdist-0.3.36`` (also the role's source version)."""
        return f"sdist-{self.version}"


def cache_root() -> Path:
    """The controller cache (llamavm.paths)."""
    return paths.cache()


def load_config(path: Path = DEFAULT_CONFIG) -> SourceConfig:
    """Read and validate the pins; raise LlamavmError on anything missing or mistyped."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise LlamavmError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise LlamavmError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise LlamavmError(f"{path}: expected a mapping at the top level")
    sdist = data.get("sdist") or {}
    ui = data.get("ui") or {}
    version = str(sdist.get("version") or "")
    if not version or any(c in version for c in "/ "):
        raise LlamavmError(f"{path}: sdist.version must be a plain version string, got {version!r}")
    exclude = data.get("ship_exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise LlamavmError(f"{path}: ship_exclude must be a list of relative paths")
    return SourceConfig(
        patches=_load_patches(path, data.get("patches") or []),
        path=path,
        package=str(sdist.get("package") or "llama-cpp-python"),
        version=version,
        tree=str(sdist.get("tree") or "vendor/llama.cpp"),
        ui_build=bool(ui.get("build", True)),
        ui_timeout_s=int(ui.get("timeout_s", 900)),
        ship_exclude=tuple(e.strip("/") for e in exclude),
    )


def _load_patches(path: Path, raw: object) -> tuple[Patch, ...]:
    if not isinstance(raw, list):
        raise LlamavmError(f"{path}: patches must be a list of {{name, file, find, replace}}")
    patches = []
    for i, entry in enumerate(raw):
        fields = ("name", "file", "find", "replace")
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) and entry.get(k) for k in fields
        ):
            raise LlamavmError(
                f"{path}: patches[{i}]: needs the strings name, file, find and replace"
            )
        rel = entry["file"]
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise LlamavmError(
                f"{path}: patches[{i}].file: {rel!r} must be a path inside the llama.cpp tree"
            )
        patches.append(Patch(entry["name"], rel, entry["find"], entry["replace"]))
    return tuple(patches)


def _sdist_stem(cfg: SourceConfig) -> str:
    # pip names sdists after the normalised project name: llama_cpp_python-0.3.36.tar.gz
    return f"{cfg.package.replace('-', '_').lower()}-{cfg.version}"


def _run(
    cmd: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: int = 900,
    what: str,
) -> None:
    """Run one external tool (proc.run: on failure raise with the tail of its output); a tool
    missing on the controller, or one that runs past `timeout`, is a one-line error too."""
    try:
        proc.run(cmd, what, cwd=cwd, env=env, timeout=timeout)
    except FileNotFoundError as exc:
        raise LlamavmError(f"{what}: {cmd[0]} not found on the controller") from exc
    except subprocess.TimeoutExpired as exc:
        raise LlamavmError(f"{what}: timed out after {timeout} s") from exc


def is_cold(config: Path = DEFAULT_CONFIG, cache: Path | None = None) -> bool:
    """Whether prepare() starts from nothing: no sdist fetched and no web UI built yet (it will
    download, extract, run npm and write the tarball)."""
    cfg = load_config(config)
    cache = cache or cache_root()
    return not (cache / "src" / _sdist_stem(cfg)).exists() and not any(
        (cache / "ui").glob(f"{cfg.version}-*")
    )


def fetch_sdist(cfg: SourceConfig, cache: Path) -> Path:
    """Return the cached sdist, downloading it with pip once."""
    src = cache / "src"
    archive = src / f"{_sdist_stem(cfg)}.tar.gz"
    if archive.is_file():
        return archive
    src.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src, prefix=".pip-") as tmp:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--dest",
                tmp,
                f"{cfg.package}=={cfg.version}",
            ],
            what=f"pip download {cfg.package}=={cfg.version}",
        )
        got = Path(tmp) / archive.name
        if not got.is_file():
            names = ", ".join(p.name for p in Path(tmp).iterdir())
            raise LlamavmError(f"pip download gave {names or 'nothing'}, expected {archive.name}")
        got.replace(archive)
    return archive


def safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract `tar` into `dest`, refusing members that could land or point outside it.

    Same on every Python the README names: Debian 12's stock 3.11.2 has no ``filter=``
    argument (PEP 706 arrived in 3.11.4), so the checks are ours; where the ``data`` filter
    exists it is applied as well.
    """
    root = dest.resolve()
    members = []
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        if member.name.startswith("/") or not target.is_relative_to(root):
            raise tarfile.TarError(f"member {member.name!r} would land outside {dest}")
        if member.issym() or member.islnk():
            base = target.parent if member.issym() else root
            link = (base / member.linkname).resolve()
            if member.linkname.startswith("/") or not link.is_relative_to(root):
                raise tarfile.TarError(f"link {member.name!r} points outside {dest}")
        elif not (member.isfile() or member.isdir()):
            raise tarfile.TarError(f"member {member.name!r} is a device or FIFO")
        member.mode &= 0o755
        members.append(member)
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, members=members, filter="data")
    else:
        tar.extractall(dest, members=members)


def extract_sdist(cfg: SourceConfig, archive: Path, cache: Path) -> Path:
    """Return the llama.cpp tree of the extracted sdist, extracting it once."""
    top = cache / "src" / _sdist_stem(cfg)
    tree = top / cfg.tree
    if (tree / "CMakeLists.txt").is_file():
        return tree
    with tempfile.TemporaryDirectory(dir=cache / "src", prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive) as tar:
                safe_extract(tar, Path(tmp))
        except (tarfile.TarError, OSError) as exc:
            raise LlamavmError(f"cannot extract {archive}: {exc}; delete it and retry") from exc
        if top.exists():
            shutil.rmtree(top)
        (Path(tmp) / top.name).replace(top)
    if not (tree / "CMakeLists.txt").is_file():
        raise LlamavmError(f"{archive} has no {cfg.tree}/CMakeLists.txt: not a llama.cpp sdist")
    return tree


def _ui_fingerprint(ui_src: Path) -> str:
    """Hash of the UI sources (not node_modules/dist): the cache key of a built UI."""
    h = hashlib.sha256()
    for path in sorted(_walk(ui_src, ("node_modules", "dist", ".svelte-kit"))):
        rel = path.relative_to(ui_src).as_posix()
        h.update(rel.encode() + b"\0")
        if path.is_file() and not path.is_symlink():
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def build_ui(cfg: SourceConfig, tree: Path, cache: Path) -> Path:
    """Return a built UI dist for this tree, running npm once per UI source fingerprint."""
    ui_src = tree / "tools" / "ui"
    if not (ui_src / "package.json").is_file():
        raise LlamavmError(f"{ui_src} has no package.json: this llama.cpp has no tools/ui")
    key = _ui_fingerprint(ui_src)
    base = cache / "ui" / f"{cfg.version}-{key}"
    dist = base / "dist"
    if (dist / "index.html").is_file():
        return dist
    work = base / "work"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(
        ui_src,
        work,
        symlinks=True,
        ignore=shutil.ignore_patterns("node_modules", "dist", ".svelte-kit"),
    )
    staging = base / "dist.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    env = dict(
        os.environ,
        LLAMA_UI_OUT_DIR=str(staging),
        NO_UPDATE_NOTIFIER="1",
        npm_config_fund="false",
        npm_config_audit="false",
    )
    _run(
        ["npm", "ci", "--no-audit", "--no-fund"],
        cwd=work,
        env=env,
        timeout=cfg.ui_timeout_s,
        what="npm ci (web UI)",
    )
    _run(
        ["npm", "run", "build"],
        cwd=work,
        env=env,
        timeout=cfg.ui_timeout_s,
        what="npm run build (web UI)",
    )
    for name in _UI_REQUIRED:
        if not (staging / name).is_file():
            raise LlamavmError(f"npm run build produced no {name} in {staging}")
    staging.replace(dist)
    shutil.rmtree(work)  # node_modules is ~0.5 GB; the dist is what we keep
    return dist


def _walk(root: Path, skip: Sequence[str] = ()) -> Iterator[Path]:
    """Every file, symlink and directory under root, skipping the given relative paths."""
    skip_set = set(skip)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        kept = []
        for d in dirnames:
            rel = d if rel_dir == "." else f"{rel_dir}/{d}"
            if rel in skip_set:
                continue
            kept.append(d)
            yield here / d
        dirnames[:] = kept
        for f in filenames:
            rel = f if rel_dir == "." else f"{rel_dir}/{f}"
            if rel not in skip_set:
                yield here / f


def _tarinfo(tar: tarfile.TarFile, path: Path, arcname: str) -> tarfile.TarInfo:
    info = tar.gettarinfo(str(path), arcname)
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if info.isdir():
        info.mode = 0o755
    elif info.isreg():
        info.mode = 0o755 if info.mode & 0o111 else 0o644
    return info


def write_tarball(
    tree: Path,
    ui_dist: Path | None,
    out: Path,
    exclude: Sequence[str],
    patches: Sequence[Patch] = (),
    where: Path = DEFAULT_CONFIG,
) -> Path:
    """Write tree (plus ui_dist as tools/ui/dist) to out as a reproducible .tar.gz, with
    `patches` applied to the files they name (`where`: the pins file, named in errors).

    Members are sorted, owned by root, with fixed mtimes and modes, and the gzip header has no
    timestamp or name: the same inputs give the same bytes on every controller.
    """
    prefix = "llama.cpp"
    entries: list[tuple[str, Path]] = [
        (f"{prefix}/{p.relative_to(tree).as_posix()}", p)
        for p in _walk(tree, [*exclude, "tools/ui/dist"])
    ]
    if ui_dist is not None:
        entries.append((f"{prefix}/tools/ui/dist", ui_dist))
        entries += [
            (f"{prefix}/tools/ui/dist/{p.relative_to(ui_dist).as_posix()}", p)
            for p in _walk(ui_dist)
        ]
    entries.sort(key=lambda e: e[0])
    patched = patched_files(tree, patches, exclude, where)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):  # type: ignore[arg-type]
        root = tarfile.TarInfo(prefix)
        root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
        root.uname = root.gname = "root"
        tar.addfile(root)
        for arcname, path in entries:
            info = _tarinfo(tar, path, arcname)
            if info.isreg() and path in patched:
                info.size = len(patched[path])
                tar.addfile(info, io.BytesIO(patched[path]))
            elif info.isreg():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    tmp.replace(out)
    return out


def patched_files(
    tree: Path, patches: Sequence[Patch], exclude: Sequence[str], where: Path
) -> dict[Path, bytes]:
    """The new bytes of every file a patch changes (several patches of one file in order)."""
    texts: dict[Path, str] = {}
    for patch in patches:
        path = tree / patch.file
        if any(patch.file == e or patch.file.startswith(f"{e}/") for e in exclude):
            raise LlamavmError(f"{where}: patch {patch.name!r}: {patch.file} is not shipped")
        if path not in texts:
            try:
                texts[path] = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise LlamavmError(
                    f"{where}: patch {patch.name!r}: cannot read {patch.file} in {tree}: "
                    f"{exc.strerror} — update or drop the patch for this source pin"
                ) from exc
        texts[path] = patch.apply(texts[path], where)
    return {path: text.encode("utf-8") for path, text in texts.items()}


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _made(cache: Path) -> Path:
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlamavmError(
            f"cannot create cache {cache}: {exc.strerror}; set LLAMAVM_CACHE"
        ) from exc
    return cache


def fetched_tree(config: Path = DEFAULT_CONFIG, cache: Path | None = None) -> Path:
    """The pinned llama.cpp tree, fetched and extracted once (the first step of prepare(): what
    the tiny models' vocabularies come from, long before the web UI is built)."""
    cfg = load_config(config)
    cache = _made(cache or cache_root())
    return extract_sdist(cfg, fetch_sdist(cfg, cache), cache)


def prepare(
    config: Path = DEFAULT_CONFIG,
    cache: Path | None = None,
    *,
    with_ui: bool | None = None,
    tree: Path | None = None,
) -> Path:
    """Fetch, extract, build the UI and write the tarball to ship; return its path.

    Idempotent and cached: a second call with the same pins only re-checks files and
    returns the same path (the tarball is rewritten only if missing). ``tree`` replaces the
    sdist's tree (tests use it to ship a deliberately broken copy).
    """
    cfg = load_config(config)
    cache = _made(cache or cache_root())
    given_tree = tree is not None
    if tree is None:
        tree = fetched_tree(config, cache)
    if not (tree / "CMakeLists.txt").is_file():
        raise LlamavmError(f"{tree} is not a llama.cpp tree (no CMakeLists.txt)")
    use_ui = cfg.ui_build if with_ui is None else with_ui
    ui_dist = build_ui(cfg, tree, cache) if use_ui else None
    # Name after everything that changes the bytes: version, UI build, format, tree, excludes.
    ident = f"{tree.resolve()}|{TARBALL_FORMAT}|{','.join(cfg.ship_exclude)}|{cfg.patch_id}"
    tree_id = hashlib.sha256(ident.encode()).hexdigest()[:8]
    ui_tag = f"ui-{ui_dist.parent.name.rsplit('-', 1)[-1]}" if ui_dist else "noui"
    out = cache / "dist" / f"llama.cpp-{cfg.label}-{ui_tag}-f{TARBALL_FORMAT}-{tree_id}.tar.gz"
    # A given tree may have changed in place: rewrite (same content gives the same bytes).
    if given_tree or not out.is_file():
        write_tarball(tree, ui_dist, out, cfg.ship_exclude, cfg.patches, cfg.path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m llamavm.artifacts.source prepare [--no-ui] [--tree DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m llamavm.artifacts.source", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="fetch+cache the sdist, build the UI, print the tarball")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="pins file")
    p.add_argument("--cache", type=Path, default=None, help="cache dir (default $LLAMAVM_CACHE)")
    p.add_argument("--no-ui", action="store_true", help="ship without the prebuilt web UI")
    p.add_argument("--tree", type=Path, default=None, help="ship this llama.cpp tree instead")
    p.add_argument(
        "--extra-vars",
        action="store_true",
        help="print ansible-playbook -e arguments instead of the path",
    )
    args = parser.parse_args(argv)
    try:
        out = prepare(
            args.config, args.cache, with_ui=False if args.no_ui else None, tree=args.tree
        )
        if args.extra_vars:
            label = load_config(args.config).label
            print(f"-e {EXTRA_VAR}={out} -e {EXTRA_VAR_VERSION}={label}")
        else:
            print(out)
    except LlamavmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "EXTRA_VAR",
    "EXTRA_VAR_VERSION",
    "Patch",
    "SourceConfig",
    "cache_root",
    "fetched_tree",
    "is_cold",
    "load_config",
    "prepare",
    "sha256_file",
    "write_tarball",
]
