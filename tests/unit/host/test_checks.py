"""The host package's checks before anything is stopped (llamavm.host.checks), on GGUFs and
files the tests write. The systemd parts are exercised on the test bed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llamavm.artifacts import tinymodel
from llamavm.host import EXIT_REFUSED, checks, fetch, gguf
from llamavm.host.contract import HostError
from tests.unit.fakes.gguf_files import tiny_vocab
from tests.unit.fakes.host import contract_for


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    vocab = tiny_vocab()
    path = tmp_path_factory.mktemp("share") / "tiny" / "t.gguf"
    return tinymodel.write(tinymodel.TinySpec("t", seed=3), path, vocab)


def _preflight(contract, name: str = "t") -> dict:
    """Everything a switch does before it stops anything: the checks, then the fetch."""
    model = contract.resolve(name)
    source = checks.preflight(contract, model, lambda _: None)
    return fetch.fetch(contract, model, source, set(), lambda _: None)


def test_valid_tiny_model_passes(tiny, tmp_path) -> None:
    contract = contract_for(tmp_path, tiny, size_bytes=tiny.stat().st_size)
    _preflight(contract, "tee")


def test_unknown_model_is_refused(tiny, tmp_path) -> None:
    contract = contract_for(tmp_path, tiny)
    with pytest.raises(HostError) as caught:
        contract.resolve("nope")
    assert caught.value.code == EXIT_REFUSED
    assert "known models: t" in str(caught.value)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:100], "file ends inside the header"),
        (lambda b: b"GGUX" + b[4:], "no GGUF magic"),
        (lambda b: b[:4] + (99).to_bytes(4, "little") + b[8:], "unsupported GGUF version 99"),
        (lambda b: b"", "no GGUF magic|file ends"),
        (lambda b: b[:16] + (1 << 40).to_bytes(8, "little") + b[24:], "implausible"),
    ],
    ids=["half", "header-cut", "magic", "version", "empty", "huge-count"],
)
def test_corrupt_gguf_is_refused(tiny, tmp_path, damage, fragment) -> None:
    bad = tmp_path / "share" / "tiny" / "t.gguf"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(damage(tiny.read_bytes()))
    contract = contract_for(tmp_path, bad)
    with pytest.raises(HostError, match=fragment) as caught:
        _preflight(contract)
    assert caught.value.code == EXIT_REFUSED
    assert "is corrupt" in str(caught.value)


def test_missing_gguf_is_refused(tmp_path) -> None:
    contract = contract_for(tmp_path, tmp_path / "empty-share" / "tiny" / "t.gguf")
    with pytest.raises(HostError, match="not found") as caught:
        _preflight(contract)
    assert caught.value.code == EXIT_REFUSED


def test_size_mismatch_is_refused(tiny, tmp_path) -> None:
    contract = contract_for(tmp_path, tiny, size_bytes=tiny.stat().st_size + 1)
    with pytest.raises(HostError, match="the catalog says"):
        _preflight(contract)


def test_sha_mismatch_is_refused_and_a_match_is_cached(tiny, tmp_path) -> None:
    contract = contract_for(tmp_path, tiny, sha256="0" * 64)
    with pytest.raises(HostError, match="sha256"):
        _preflight(contract)
    good = tinymodel.sha256(tiny)
    contract = contract_for(tmp_path, tiny, sha256=good)
    _preflight(contract)
    cached = json.loads(contract.paths.sha_cache.read_text())
    assert cached[str(tiny)]["sha256"] == good


def test_the_sha_cache_survives_state_writes(tiny, tmp_path) -> None:
    """It used to live in the state file, which every switch rewrote from an older copy."""
    from llamavm.host import store

    contract = contract_for(tmp_path, tiny, sha256=tinymodel.sha256(tiny))
    assert _preflight(contract)["read_bytes"] == tiny.stat().st_size
    store.write_json(contract.paths.state, store.empty_state())
    again = _preflight(contract)
    assert again["read_bytes"] == 0, "the file was read (and hashed) again"
    assert again["from"] == "page cache"


def test_over_budget_is_refused_with_the_fix(tiny, tmp_path) -> None:
    verdict = {
        "verdict": "over budget",
        "total_mib": 40000,
        "available_mib": 31583,
        "suggested_n_cpu_moe": 12,
    }
    contract = contract_for(tmp_path, tiny, vram=verdict)
    with pytest.raises(HostError, match=r"n_cpu_moe: 12 fits") as caught:
        _preflight(contract)
    assert caught.value.code == EXIT_REFUSED


@pytest.mark.parametrize("content", ["", "\n", "short\n", "has a space " + "x" * 40])
def test_an_unusable_api_key_is_refused(tiny, tmp_path, content) -> None:
    contract = contract_for(tmp_path, tiny, api_key_policy="required")
    contract.api_key_file.write_text(content)
    with pytest.raises(HostError, match="would be open") as caught:
        _preflight(contract)
    assert caught.value.code == EXIT_REFUSED


def test_a_good_api_key_passes(tiny, tmp_path) -> None:
    contract = contract_for(tmp_path, tiny, api_key_policy="required")
    contract.api_key_file.write_text("k" * 48 + "\n")
    _preflight(contract)
    assert checks.api_key(contract) == "k" * 48


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to test another user's view")
def test_unreadable_for_service_user_is_refused(tiny, tmp_path) -> None:
    copy = tmp_path / "share" / "tiny" / "t.gguf"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(tiny.read_bytes())
    copy.chmod(0o600)  # root can read it; the service user (nobody) cannot
    for part in (tmp_path, tmp_path / "share", copy.parent):
        part.chmod(0o755)
    contract = contract_for(tmp_path, copy, service_user="nobody")
    with pytest.raises(HostError, match="not readable by the service user nobody"):
        _preflight(contract)


def test_a_header_that_passed_is_not_read_again_until_the_file_changes(
    tiny, tmp_path, monkeypatch
) -> None:
    path = tmp_path / "share" / "tiny" / "t.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(tiny.read_bytes())
    contract = contract_for(tmp_path, path)
    marker = tmp_path / "header-read"  # the check runs in a forked child: it leaves a file
    real = gguf.check_header

    def marked(file: Path, size: int) -> None:
        marker.write_text("read")
        real(file, size)

    monkeypatch.setattr(gguf, "check_header", marked)
    _preflight(contract)
    assert marker.exists()  # the first check reads the header
    marker.unlink()
    _preflight(contract)
    assert not marker.exists()  # the same version of the file: not again
    # A new version (here damaged, same size) is read again, and refused.
    data = bytearray(path.read_bytes())
    data[:4] = b"GGUX"
    path.write_bytes(bytes(data))
    with pytest.raises(HostError, match="no GGUF magic"):
        _preflight(contract)
    assert marker.exists()
