"""The host-side llamavm-switch: the checks it makes before stopping anything.

These run on the controller against files the tests write; the systemd parts are exercised on
the test bed (tests/integration/test_model_services.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
from pathlib import Path

import pytest

from llamavm import REPO_ROOT, tinymodel

HELPER = REPO_ROOT / "ansible" / "roles" / "model_services" / "files" / "llamavm_switch.py"


@pytest.fixture(scope="module")
def sw():
    spec = importlib.util.spec_from_file_location("llamavm_switch", HELPER)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    try:
        vocab = tinymodel.find_vocab()
    except Exception as exc:  # the llama.cpp source is not cached on this machine
        pytest.skip(f"no vocab: {exc}")
    path = tmp_path_factory.mktemp("share") / "tiny" / "t.gguf"
    return tinymodel.write(tinymodel.TinySpec("t", seed=3), path, vocab)


def _catalog(sw, tmp_path: Path, share: Path, **model) -> object:
    entry = {
        "name": "t",
        "aliases": ["tee"],
        "gguf": "tiny/t.gguf",
        "port": 8001,
        "ctx_size": 1024,
        "parallel": 1,
        "health_timeout_s": 60,
        "unit": "llamavm-model-t.service",
        **model,
    }
    data = {
        "settings": {
            "share_path": str(share),
            "bind_address": "0.0.0.0",
            "service_user": pwd.getpwuid(os.getuid()).pw_name,
            "api_key": {"policy": "none", "file": "/nonexistent"},
        },
        "models": [entry],
    }
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(data))
    return sw.Catalog(path)


def test_valid_tiny_model_passes(sw, tiny, tmp_path) -> None:
    cat = _catalog(sw, tmp_path, tiny.parent.parent, size_bytes=tiny.stat().st_size)
    sw.preflight(cat, cat.resolve("tee"))


def test_unknown_model_is_refused(sw, tiny, tmp_path) -> None:
    cat = _catalog(sw, tmp_path, tiny.parent.parent)
    with pytest.raises(sw.SwitchError) as caught:
        cat.resolve("nope")
    assert caught.value.code == 2
    assert "known models: t" in str(caught.value)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:100], "file ends inside the header"),
        (lambda b: b"GGUX" + b[4:], "no GGUF magic"),
        (lambda b: b[:4] + (99).to_bytes(4, "little") + b[8:], "unsupported GGUF version 99"),
        (lambda b: b"", "no GGUF magic|file ends"),
    ],
    ids=["half", "header-cut", "magic", "version", "empty"],
)
def test_corrupt_gguf_is_refused(sw, tiny, tmp_path, damage, fragment) -> None:
    share = tmp_path / "share"
    bad = share / "tiny" / "t.gguf"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(damage(tiny.read_bytes()))
    cat = _catalog(sw, tmp_path, share)
    with pytest.raises(sw.SwitchError, match=fragment) as caught:
        sw.preflight(cat, cat.resolve("t"))
    assert caught.value.code == 2
    assert "is corrupt" in str(caught.value)


def test_missing_gguf_is_refused(sw, tmp_path) -> None:
    cat = _catalog(sw, tmp_path, tmp_path / "empty-share")
    with pytest.raises(sw.SwitchError, match="not found") as caught:
        sw.preflight(cat, cat.resolve("t"))
    assert caught.value.code == 2


def test_size_mismatch_is_refused(sw, tiny, tmp_path) -> None:
    cat = _catalog(sw, tmp_path, tiny.parent.parent, size_bytes=tiny.stat().st_size + 1)
    with pytest.raises(sw.SwitchError, match="the catalog says"):
        sw.preflight(cat, cat.resolve("t"))


def test_sha_mismatch_is_refused_and_match_is_cached(sw, tiny, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sw, "STATE", tmp_path / "state.json")
    cat = _catalog(sw, tmp_path, tiny.parent.parent, sha256="0" * 64)
    with pytest.raises(sw.SwitchError, match="sha256"):
        sw.preflight(cat, cat.resolve("t"))
    good = tinymodel.sha256(tiny)
    cat = _catalog(sw, tmp_path, tiny.parent.parent, sha256=good)
    sw.preflight(cat, cat.resolve("t"))
    cached = json.loads((tmp_path / "state.json").read_text())["sha256"]
    assert cached[str(tiny)]["sha256"] == good


def test_over_budget_is_refused_with_the_fix(sw, tiny, tmp_path) -> None:
    verdict = {
        "verdict": "over budget",
        "total_mib": 40000,
        "available_mib": 31583,
        "suggested_n_cpu_moe": 12,
    }
    cat = _catalog(sw, tmp_path, tiny.parent.parent, vram=verdict)
    with pytest.raises(sw.SwitchError, match=r"n_cpu_moe: 12 fits") as caught:
        sw.preflight(cat, cat.resolve("t"))
    assert caught.value.code == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to test another user's view")
def test_unreadable_for_service_user_is_refused(sw, tiny, tmp_path) -> None:
    share = tmp_path / "share"
    copy = share / "tiny" / "t.gguf"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(tiny.read_bytes())
    copy.chmod(0o600)  # root can read it; the service user (nobody) cannot
    share.chmod(0o755)
    tmp_path.chmod(0o755)
    cat = _catalog(sw, tmp_path, share)
    cat.settings["service_user"] = "nobody"
    with pytest.raises(sw.SwitchError, match="not readable by the service user nobody"):
        sw.preflight(cat, cat.resolve("t"))


def test_learned_timeout(sw) -> None:
    model = {"name": "m", "health_timeout_s": 600}
    assert sw.learned_timeout(model, {}) == 600  # no history: the catalog's ceiling
    assert sw.learned_timeout(model, {"loads": {"m": [0.3, 0.5]}}) == sw.TIMEOUT_FLOOR_S
    assert sw.learned_timeout(model, {"loads": {"m": [40, 60]}}) == 180
    assert sw.learned_timeout(model, {"loads": {"m": [400]}}) == 600
