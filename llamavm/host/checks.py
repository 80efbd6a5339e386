"""Everything that can be known before the serving model is stopped: the GGUF is there,
readable by the service user, sound, the size and digest the catalog pinned, within the VRAM
budget, and the API key usable. A failure here refuses the switch (exit 2), nothing stopped."""

from __future__ import annotations

import errno
import hashlib
import os
import pwd
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamavm.host import EXIT_REFUSED, gguf, store
from llamavm.host.contract import Contract, HostError, Model


def readable_by(path: Path, user: str) -> bool:
    """Can `user` read `path`, judging by mode bits along the whole path (root reads all)?"""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return os.access(path, os.R_OK)
    groups = {entry.pw_gid, *os.getgrouplist(user, entry.pw_gid)}
    for part in [*reversed(path.parents), path]:
        info = part.stat()
        bits = (0o400, 0o040, 0o004) if part == path else (0o100, 0o010, 0o001)
        if info.st_uid == entry.pw_uid:
            allowed = info.st_mode & bits[0]
        elif info.st_gid in groups:
            allowed = info.st_mode & bits[1]
        else:
            allowed = info.st_mode & bits[2]
        if not allowed:
            return False
    return True


def sha256_cached(
    cache: Path, path: Path, info: os.stat_result, progress: Callable[[str], None]
) -> str:
    """SHA-256 of a (large) file, remembered per file version (inode, size, mtime).

    The cache is its own file, so nothing else that writes state can drop it: a 60 GB GGUF is
    hashed once, not on every switch. Called under the switch lock.
    """
    key = f"{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"
    try:
        data = store.read_json(cache) or {}
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    entry = data.get(str(path))
    if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("sha256"), str):
        return str(entry["sha256"])
    progress(f"computing sha256 of {path} ({info.st_size / 2**30:.1f} GiB), once per file version")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    data[str(path)] = {"key": key, "sha256": value}
    store.write_json(cache, data)
    return value


def api_key(contract: Contract) -> str | None:
    """The API key the servers demand, or None when the policy is 'none'.

    An empty or short key file would make llama-server serve an open API: refuse it.
    """
    if contract.api_key_policy != "required":
        return None
    try:
        key = contract.api_key_file.read_text().strip()
    except OSError as exc:
        raise HostError(
            f"cannot read the API key {contract.api_key_file}: {exc.strerror} — run 'invoke "
            "provision' to create it",
            EXIT_REFUSED,
        ) from None
    if len(key) < contract.api_key_min_length or any(c.isspace() for c in key):
        raise HostError(
            f"the API key in {contract.api_key_file} is empty, short or has spaces (a server "
            f"with it would be open) — put one line of {contract.api_key_min_length}+ "
            "characters there, or remove the file and run 'invoke provision'",
            EXIT_REFUSED,
        )
    return key


def preflight(contract: Contract, model: Model, progress: Callable[[str], None]) -> None:
    """Refuse (exit 2) what would fail after the stop."""
    path, name = model.gguf, model.name
    try:
        info = path.stat()
    except FileNotFoundError:
        raise HostError(
            f"{name}: GGUF {path} not found — check the catalog's gguf path and the model share",
            EXIT_REFUSED,
        ) from None
    except OSError as exc:
        raise HostError(
            f"{name}: GGUF {path} not reachable ({exc.strerror}) — check the model share",
            EXIT_REFUSED,
        ) from None
    try:
        with path.open("rb"):
            pass
        if not readable_by(path, contract.service_user):
            raise PermissionError(errno.EACCES, "not readable by the service user")
    except PermissionError:
        raise HostError(
            f"{name}: GGUF {path} is not readable by the service user {contract.service_user} "
            "— make it world-readable (chmod a+r) on the share",
            EXIT_REFUSED,
        ) from None
    if model.size_bytes and info.st_size != model.size_bytes:
        raise HostError(
            f"{name}: GGUF {path} is {info.st_size} bytes, the catalog says {model.size_bytes} "
            "— re-download the file or fix size_bytes",
            EXIT_REFUSED,
        )
    try:
        gguf.check_header(path, info.st_size)
    except (ValueError, struct.error, OSError) as exc:
        raise HostError(
            f"{name}: GGUF {path} is corrupt ({exc}) — re-download or re-convert it",
            EXIT_REFUSED,
        ) from None
    if model.sha256 and sha256_cached(contract.paths.sha_cache, path, info, progress) != (
        model.sha256
    ):
        raise HostError(
            f"{name}: GGUF {path} does not match the catalog's sha256 — re-download the file "
            "or fix sha256",
            EXIT_REFUSED,
        )
    _vram(model.vram, name)
    api_key(contract)


def _vram(vram: dict[str, Any], name: str) -> None:
    if vram.get("verdict") != "over budget":
        return
    hint = ""
    if vram.get("suggested_n_cpu_moe") is not None:
        hint = f" (n_cpu_moe: {vram['suggested_n_cpu_moe']} fits)"
    raise HostError(
        f"{name}: needs {vram.get('total_mib', 0):.0f} MiB of GPU memory, the budget leaves "
        f"{vram.get('available_mib', 0):.0f} MiB — lower ctx_size or raise n_cpu_moe{hint}",
        EXIT_REFUSED,
    )
