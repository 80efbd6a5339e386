"""Fetching a model's bytes before the stop (llamavm.host.fetch, llamavm.host.share): staging
with LRU eviction, pre-warm, a share that stops answering. Files stand in for the share; a FIFO
stands in for an NFS server that went away (opening it blocks, as an open on a dead hard mount
does)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

import pytest

from llamavm.artifacts import tinymodel
from llamavm.host import EXIT_REFUSED, checks, fetch, pagecache, share
from llamavm.host.contract import Contract, HostError
from tests.unit.fakes.gguf_files import tiny_vocab
from tests.unit.fakes.host import contracts, with_fields


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    vocab = tiny_vocab()
    root = tmp_path_factory.mktemp("share")
    return {
        name: tinymodel.write(tinymodel.TinySpec(name, seed=i), root / name / "m.gguf", vocab)
        for i, name in enumerate(("a", "b", "c"))
    }


def _staging(tmp_path: Path, ggufs: dict[str, Path], **top) -> Contract:
    """A contract whose models read staged copies of the share's files."""
    contract = contracts(tmp_path, dict(ggufs), **top)
    models = tuple(
        with_fields(m, load="stage", source_path=m.gguf, gguf=contract.stage_dir / f"{m.name}.gguf")
        for m in contract.models
    )
    return dataclasses.replace(contract, models=models)


def _fetch(contract, name: str, keep: set[str] = frozenset(), lines=None) -> dict:
    model = contract.resolve(name)
    say = (lines if lines is not None else []).append
    source = checks.preflight(contract, model, say)
    return fetch.fetch(contract, model, source, set(keep), say)


def test_staging_copies_verifies_and_is_warm_the_second_time(ggufs, tmp_path) -> None:
    contract = _staging(tmp_path, ggufs)
    first = _fetch(contract, "a")
    staged = contract.resolve("a").gguf
    assert first["cold"] and first["read_bytes"] == ggufs["a"].stat().st_size
    assert staged.read_bytes() == ggufs["a"].read_bytes()
    assert oct(staged.stat().st_mode & 0o777) == "0o644"
    assert not list(staged.parent.glob(".*partial"))
    second = _fetch(contract, "a")
    assert second == {"cold": False, "read_bytes": 0, "seconds": 0.0, "from": "staged"}
    assert fetch.location(contract, contract.resolve("a")) == "staged"


def test_a_file_replaced_on_the_share_is_staged_again(ggufs, tmp_path) -> None:
    source = tmp_path / "src" / "a.gguf"
    source.parent.mkdir()
    source.write_bytes(ggufs["a"].read_bytes())
    contract = _staging(tmp_path, {"a": source})
    _fetch(contract, "a")
    staged = contract.resolve("a").gguf
    held = staged.open("rb")  # a server still reading the old copy keeps its bytes
    replacement = source.with_name("new.gguf")
    replacement.write_bytes(ggufs["b"].read_bytes())
    os.replace(replacement, source)
    again = _fetch(contract, "a")
    assert again["cold"], "a new file version must be copied"
    assert staged.read_bytes() == ggufs["b"].read_bytes()
    assert held.read() == ggufs["a"].read_bytes()
    held.close()


def test_a_sha_mismatch_stages_nothing(ggufs, tmp_path) -> None:
    contract = _staging(
        tmp_path,
        {"a": ggufs["a"]},
    )
    contract = dataclasses.replace(
        contract, models=(with_fields(contract.models[0], sha256="0" * 64),)
    )
    with pytest.raises(HostError, match="sha256") as caught:
        _fetch(contract, "a")
    assert caught.value.code == EXIT_REFUSED
    assert not contract.resolve("a").gguf.exists()
    assert not list(contract.stage_dir.glob(".*"))


def test_staging_evicts_the_least_recently_used_copy_under_the_cap(ggufs, tmp_path) -> None:
    size = max(p.stat().st_size for p in ggufs.values())
    contract = _staging(tmp_path, ggufs, stage_cap_bytes=2 * size + size // 2)
    _fetch(contract, "a")
    time.sleep(0.01)
    _fetch(contract, "b")
    time.sleep(0.01)
    _fetch(contract, "a")  # a used again: b is now the oldest
    lines: list[str] = []
    _fetch(contract, "c", lines=lines)
    assert [fetch.location(contract, m) for m in contract.models] == [
        "staged",
        "not staged",
        "staged",
    ]
    assert any("evicting the staged copy of b" in line for line in lines)


def test_a_copy_in_use_is_never_evicted(ggufs, tmp_path) -> None:
    size = max(p.stat().st_size for p in ggufs.values())
    contract = _staging(tmp_path, ggufs, stage_cap_bytes=size + size // 2)
    _fetch(contract, "a")
    with pytest.raises(HostError, match="stage_cap_gib") as caught:
        _fetch(contract, "b", keep={"a"})
    assert caught.value.code == EXIT_REFUSED
    assert fetch.location(contract, contract.resolve("a")) == "staged"
    assert not contract.resolve("b").gguf.exists()


def test_a_share_that_stops_answering_refuses_within_the_stall_limit(tmp_path) -> None:
    fifo = tmp_path / "share" / "m.gguf"
    fifo.parent.mkdir()
    os.mkfifo(fifo)  # stat answers, open blocks: a dead NFS server under a hard mount
    contract = contracts(tmp_path, {"a": fifo}, share_stall_s=0.5)
    began = time.monotonic()
    with pytest.raises(HostError, match=r"not reachable .*no progress for 0.5s") as caught:
        checks.preflight(contract, contract.resolve("a"), lambda _: None)
    assert time.monotonic() - began < 5
    assert caught.value.code == EXIT_REFUSED


def test_with_the_share_away_a_staged_copy_still_serves(ggufs, tmp_path) -> None:
    contract = _staging(tmp_path, {"a": ggufs["a"]}, share_stall_s=0.5)
    _fetch(contract, "a")
    fifo = tmp_path / "dead.gguf"
    os.mkfifo(fifo)
    away = dataclasses.replace(
        contract, models=(with_fields(contract.models[0], source_path=fifo),)
    )
    lines: list[str] = []
    result = _fetch(away, "a", lines=lines)
    assert result["from"] == "staged"
    assert any("did not answer" in line or "no progress" in line for line in lines)


def test_a_stalled_reader_is_killed(tmp_path) -> None:
    marker = tmp_path / "pid"

    def work(report) -> dict:
        marker.write_text(str(os.getpid()))
        time.sleep(60)
        return {}

    with pytest.raises(share.ShareError, match="no progress") as caught:
        share.bounded(work, what="reading", stall_s=0.3)
    assert caught.value.errno_name == "ETIMEDOUT"
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_pre_warm_reports_bytes_rate_and_eta(tmp_path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * pagecache.CHUNK))
    lines: list[str] = []

    def slow(report) -> dict:
        for i in range(1, 4):
            time.sleep(0.6)
            report(i * pagecache.CHUNK)
        return {"bytes": 3 * pagecache.CHUNK}

    share.bounded(
        slow, what="pre-warming x", stall_s=5, total=3 * pagecache.CHUNK, progress=lines.append
    )
    assert lines, "no progress line in 1.8 s"
    assert "pre-warming x: 0.0" in lines[0] and "GiB" in lines[0] and "MB/s" in lines[0]
    assert any("ETA" in line for line in lines)


def test_pre_warm_reads_a_cold_file_and_checks_its_digest(ggufs, tmp_path) -> None:
    copy = tmp_path / "m.gguf"
    copy.write_bytes(ggufs["a"].read_bytes())
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    contract = contracts(
        tmp_path,
        {"a": copy},
    )
    contract = dataclasses.replace(
        contract, models=(with_fields(contract.models[0], sha256=digest),)
    )
    first = _fetch(contract, "a")
    assert first["from"] == "share" and first["read_bytes"] == copy.stat().st_size
    assert _fetch(contract, "a")["from"] == "page cache"
