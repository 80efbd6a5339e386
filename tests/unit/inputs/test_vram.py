"""VRAM admission on GGUF files written here with known tensor shapes.

Expected numbers are computed in the tests by plain arithmetic from the shapes, independently
of llamavm.inputs.vram, so a wrong placement rule or byte count in the estimate fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llamavm.inputs import catalog, vram
from tests.unit.fakes.gguf_files import (
    EMBD_BYTES,
    EXPERT_LAYER_BYTES,
    F32,
    HEAD_DIM,
    LAYER_BYTES,
    MIB,
    N_EMBD,
    N_HEAD_KV,
    N_LAYER,
    N_VOCAB,
    OUTPUT_BYTES,
    add_tensor,
    finish,
    gguf_writer,
    write_model,
)


def _catalog(tmp_path: Path, budget_mib: int, reserve_mib: int = 1, compute_mib: int = 1, **model):
    entry = {"name": "m", "gguf": "m.gguf", "port": 8001, **model}
    data = {
        "settings": {
            "share_path": "/srv/models",
            "controller_share_path": str(tmp_path),
            "default_model": "m",
            "vram": {
                "budget_mib": budget_mib,
                "reserve_mib": reserve_mib,
                "compute_mib": compute_mib,
            },
        },
        "models": [entry],
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    return catalog.load(path)


def kv_bytes(ctx: int, layers: int, per_elem: float) -> float:
    return ctx * layers * 2 * N_HEAD_KV * HEAD_DIM * per_elem


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))


def test_the_header_is_read_once_per_version_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_model(tmp_path / "m.gguf")
    first = vram.read_gguf(path)
    reads: list[Path] = []
    real = vram._read_gguf
    monkeypatch.setattr(vram, "_read_gguf", lambda p: reads.append(p) or real(p))
    assert vram.read_gguf(path) == first and reads == []  # from the cache, the same answer
    moe = write_model(tmp_path / "other.gguf", moe=True)
    moe.replace(path)  # a new version of the same path: read again
    again = vram.read_gguf(path)
    assert reads == [path] and again.is_moe and again != first


def test_header_fields(tmp_path: Path) -> None:
    info = vram.read_gguf(write_model(tmp_path / "m.gguf"))
    assert (info.architecture, info.n_layer, info.n_embd) == ("llama", N_LAYER, N_EMBD)
    assert info.n_head_kv == (N_HEAD_KV,) * N_LAYER
    assert info.key_length == info.value_length == HEAD_DIM
    assert info.file_bytes == N_LAYER * LAYER_BYTES + EMBD_BYTES + OUTPUT_BYTES
    assert not info.is_moe


@pytest.mark.parametrize(
    ("ngl", "weights"),
    [
        (999, N_LAYER * LAYER_BYTES + OUTPUT_BYTES),  # everything but token_embd
        (N_LAYER + 1, N_LAYER * LAYER_BYTES + OUTPUT_BYTES),
        (N_LAYER, N_LAYER * LAYER_BYTES),  # all blocks, output stays on the CPU
        (1, LAYER_BYTES),
        (0, 0),
    ],
)
def test_dense_weights_and_kv(tmp_path: Path, ngl: int, weights: int) -> None:
    write_model(tmp_path / "m.gguf")
    cat = _catalog(tmp_path, 1000, ctx_size=1024, n_gpu_layers=ngl, cache_type="f16")
    est = vram.estimate(cat, cat.models[0])
    layers_on_gpu = min(ngl, N_LAYER)
    assert est.weights_mib == pytest.approx(weights / MIB)
    assert est.kv_mib == pytest.approx(kv_bytes(1024, layers_on_gpu, 2) / MIB, abs=1e-6)
    assert est.compute_mib == 1
    expected_total = (weights + kv_bytes(1024, layers_on_gpu, 2)) / MIB + 1
    assert est.total_mib == pytest.approx(expected_total, abs=1e-6)
    assert est.verdict == "fits"


@pytest.mark.parametrize(
    ("cache_type", "per_elem"), [("f32", 4), ("q8_0", 34 / 32), ("q4_0", 18 / 32)]
)
def test_kv_cache_types(tmp_path: Path, cache_type: str, per_elem: float) -> None:
    write_model(tmp_path / "m.gguf")
    cat = _catalog(tmp_path, 1000, ctx_size=8192, cache_type=cache_type)
    est = vram.estimate(cat, cat.models[0])
    assert est.kv_mib == pytest.approx(kv_bytes(8192, N_LAYER, per_elem) / MIB, rel=1e-6)


def test_tied_embeddings_put_a_copy_on_the_gpu(tmp_path: Path) -> None:
    write_model(tmp_path / "m.gguf", tied=True)
    cat = _catalog(tmp_path, 1000, ctx_size=256)
    est = vram.estimate(cat, cat.models[0])
    expected = N_LAYER * LAYER_BYTES + N_EMBD * F32 + EMBD_BYTES
    assert est.weights_mib == pytest.approx(expected / MIB)


def test_split_gguf_sums_every_shard(tmp_path: Path) -> None:
    first = tmp_path / "m-00001-of-00002.gguf"
    w = gguf_writer(first)
    add_tensor(w, "token_embd.weight", N_VOCAB, N_EMBD)
    finish(w)
    second = tmp_path / "m-00002-of-00002.gguf"
    write_model(second, layers=range(N_LAYER))  # holds the blocks (and its own output)
    info = vram.read_gguf(first)
    assert info.file_bytes == 2 * EMBD_BYTES + N_LAYER * LAYER_BYTES + OUTPUT_BYTES


def test_moe_n_cpu_moe_changes_the_verdict(tmp_path: Path) -> None:
    write_model(tmp_path / "m.gguf", moe=True)
    dense_part = N_LAYER * LAYER_BYTES + OUTPUT_BYTES
    kv = kv_bytes(512, N_LAYER, 2)

    def total(n_cpu_moe: int) -> float:
        experts = (N_LAYER - n_cpu_moe) * EXPERT_LAYER_BYTES
        return (dense_part + experts + kv) / MIB + 1  # + compute_mib

    # Budget (minus a 1 MiB reserve) that fits with 2 expert layers on the CPU but not with 1.
    available = int(total(2)) + 1
    assert total(1) > available >= total(2)
    cat = _catalog(tmp_path, available + 1, reserve_mib=1, ctx_size=512)
    model = cat.models[0]
    est = vram.estimate(cat, model)
    assert est.verdict == "over budget"
    assert est.total_mib == pytest.approx(total(0), abs=1e-6)
    assert est.suggested_n_cpu_moe == 2

    cat2 = _catalog(tmp_path, available + 1, reserve_mib=1, ctx_size=512, n_cpu_moe=2)
    est2 = vram.estimate(cat2, cat2.models[0])
    assert est2.verdict == "fits"
    assert est2.total_mib == pytest.approx(total(2), abs=1e-6)
    assert est2.suggested_n_cpu_moe is None


def test_moe_that_never_fits_has_no_suggestion(tmp_path: Path) -> None:
    write_model(tmp_path / "m.gguf", moe=True)
    cat = _catalog(tmp_path, 3, reserve_mib=1, ctx_size=512)
    est = vram.estimate(cat, cat.models[0])
    assert est.verdict == "over budget"
    assert est.suggested_n_cpu_moe is None


def test_override_wins(tmp_path: Path) -> None:
    cat = _catalog(tmp_path, 1000, vram_mib=2000)
    est = vram.estimate(cat, cat.models[0])
    assert (est.verdict, est.source, est.total_mib) == ("over budget", "override", 2000)


def test_unreachable_says_so(tmp_path: Path) -> None:
    cat = _catalog(tmp_path, 1000)
    est = vram.estimate(cat, cat.models[0])
    assert est.verdict == "unknown"
    assert "GGUF not found" in est.reason
    assert est.total_mib is None


def test_corrupt_gguf_says_so(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    cat = _catalog(tmp_path, 1000)
    est = vram.estimate(cat, cat.models[0])
    assert est.verdict == "unknown"
    assert "not a valid GGUF" in est.reason


def test_cli_models_suggests_n_cpu_moe(tmp_path: Path, invoke_cli) -> None:
    write_model(tmp_path / "m.gguf", moe=True)
    dense_mib = (N_LAYER * LAYER_BYTES + OUTPUT_BYTES + kv_bytes(512, N_LAYER, 2)) / MIB
    budget = int(dense_mib + 2 * EXPERT_LAYER_BYTES / MIB) + 3  # room for 2 expert layers
    cat = _catalog(tmp_path, budget, reserve_mib=1, ctx_size=512)
    result = invoke_cli("models", "--catalog", str(cat.path))
    assert result.returncode == 0, result.stderr
    assert "over budget" in result.stdout
    assert "set n_cpu_moe: 2 to fit" in result.stdout
    data = json.loads(invoke_cli("models", "--json", "--catalog", str(cat.path)).stdout)
    assert data["models"][0]["vram"]["suggested_n_cpu_moe"] == 2
    assert data["models"][0]["vram"]["verdict"] == "over budget"
