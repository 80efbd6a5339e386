"""The host package as one file: a zipapp of llamavm/host/ that hosts run as llamavm-switch.

Built deterministically (fixed timestamps, sorted members), so the same code gives the same
bytes and Ansible's copy changes nothing on a second provision. Cached under
${LLAMAVM_CACHE}/host/ by content hash.

Each module also goes in compiled (an unchecked hash-based .pyc for this controller's Python):
zipimport can't cache bytecode, and compiling the package at every start cost ~70 ms of each
`llamavm-switch` run — a switch starts three or four. A host whose Python differs (another
magic number) ignores the .pyc and compiles the source, as before.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import marshal
import os
import zipfile
from pathlib import Path

from llamavm import REPO_ROOT, paths

SOURCE = REPO_ROOT / "llamavm" / "host"
#: -I: a root tool ignores PYTHON* variables and the user's site-packages.
SHEBANG = b"#!/usr/bin/python3 -I\n"
_STAMP = (2020, 1, 1, 0, 0, 0)
_INIT = b'"""llamavm on a model host: only the host package (llamavm.host) is here."""\n'


def _members() -> list[tuple[str, bytes]]:
    members = [("llamavm/__init__.py", _INIT)]
    for path in sorted(SOURCE.glob("*.py")):
        members.append((f"llamavm/host/{path.name}", path.read_bytes()))
    members += [(name.removesuffix(".py") + ".pyc", _pyc(name, data)) for name, data in members]
    members.append(("__main__.py", (SOURCE / "__main__.py").read_bytes()))
    return sorted(members)


def _pyc(name: str, source: bytes) -> bytes:
    """`source` compiled, as an unchecked hash-based .pyc (PEP 552): no timestamps in it."""
    code = compile(source, name, "exec", dont_inherit=True)
    flags = 0b01  # hash-based, not checked against the source
    return (
        importlib.util.MAGIC_NUMBER
        + flags.to_bytes(4, "little")
        + importlib.util.source_hash(source)
        + marshal.dumps(code)
    )


def archive_bytes() -> bytes:
    """The zipapp's bytes: the shebang line, then the zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in _members():
            info = zipfile.ZipInfo(name, date_time=_STAMP)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return SHEBANG + buffer.getvalue()


def source_key() -> str:
    """The package's key: its sources (and this Python's bytecode magic), not the zip's bytes —
    marshal's output for the same code differs between processes (reference counts, string
    interning), so the .pyc in two builds need not be byte-equal."""
    digest = hashlib.sha256(importlib.util.MAGIC_NUMBER + SHEBANG + _INIT)
    for path in sorted(SOURCE.glob("*.py")):
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def build(cache: Path | None = None) -> Path:
    """Write the zipapp once per source and return its path: the same sources give the same
    file in every later run (a provision's digest and Ansible's copy see no change)."""
    root = cache / "host" if cache else paths.host_packages()
    path = root / f"llamavm-host-{source_key()[:16]}.pyz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(archive_bytes())
        tmp.chmod(0o755)
        os.replace(tmp, path)
    return path
