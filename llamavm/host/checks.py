"""Everything that can be known before the serving model is stopped: the GGUF is there (asked
of the share in a watched child, see share.py), readable by the service user, sound, the size
(and, once hashed, the digest) the catalog pinned, within the VRAM budget, and the API key
usable. A failure here refuses the switch (exit 2), nothing stopped. The digest of a new file
version is checked while its bytes are fetched (fetch.fetch), still before the stop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamavm.host import EXIT_REFUSED, fetch, share
from llamavm.host.contract import Contract, HostError, Model


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


def preflight(
    contract: Contract, model: Model, progress: Callable[[str], None]
) -> dict[str, Any] | None:
    """Refuse (exit 2) what would fail after the stop. Returns what the share said of the
    model's file, or None when the share did not answer but a staged copy can serve."""
    path, name = model.source, model.name
    _vram(model.vram, name)
    api_key(contract)
    try:
        info = share.inspect(
            path,
            contract.service_user,
            contract.share_stall_s,
            header_checked=fetch.header_checked(contract, path),
        )
    except share.ShareError as exc:
        if exc.errno_name == "ENOENT":
            raise HostError(
                f"{name}: GGUF {path} not found — check the catalog's gguf path and the model "
                "share",
                EXIT_REFUSED,
            ) from None
        if exc.errno_name in ("EACCES", "EPERM"):
            raise _unreadable(name, path, contract) from None
        if model.load == "stage" and fetch.staged_record(contract, model) is not None:
            progress(f"{exc}")
            return None
        raise HostError(
            f"{name}: GGUF {path} not reachable ({exc}) — check the model share", EXIT_REFUSED
        ) from None
    if not info["readable"]:
        raise _unreadable(name, path, contract)
    if model.size_bytes and info["size"] != model.size_bytes:
        raise HostError(
            f"{name}: GGUF {path} is {info['size']} bytes, the catalog says {model.size_bytes} "
            "— re-download the file or fix size_bytes",
            EXIT_REFUSED,
        )
    if info["header"]:
        raise HostError(
            f"{name}: GGUF {path} is corrupt ({info['header']}) — re-download or re-convert it",
            EXIT_REFUSED,
        )
    fetch.remember_header(contract, path, info)
    known = fetch.cached_sha(contract, path, info)
    if model.sha256 and known and known != model.sha256:
        raise HostError(
            f"{name}: GGUF {path} does not match the catalog's sha256 — re-download the file "
            "or fix sha256",
            EXIT_REFUSED,
        )
    return info


def _unreadable(name: str, path: Path, contract: Contract) -> HostError:
    return HostError(
        f"{name}: GGUF {path} is not readable by the service user {contract.service_user} "
        "— make it world-readable (chmod a+r) on the share",
        EXIT_REFUSED,
    )


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
