"""`invoke models`: every model with its VRAM estimate and verdict, as a table or JSON."""

from __future__ import annotations

import json
from typing import Any

from llamavm.catalog import Catalog
from llamavm.vram import Estimate, estimate


def rows(
    catalog: Catalog, data: dict[str, Any] | None = None
) -> list[tuple[dict[str, Any], Estimate]]:
    """Each model's catalog entry (from `data`, default: the catalog as data) and estimate."""
    entries = (data or catalog.as_dict())["models"]
    return [
        (entry, estimate(catalog, model))
        for model, entry in zip(catalog.models, entries, strict=True)
    ]


def as_json(catalog: Catalog) -> str:
    data = catalog.as_dict()
    for entry, est in rows(catalog, data):
        entry["vram"] = est.as_dict()
    return json.dumps(data, indent=2)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024:.1f}G" if value >= 1024 else f"{value:.0f}M"


def as_table(catalog: Catalog) -> str:
    s = catalog.settings
    lines = [
        f"catalog: {catalog.path}",
        f"share: {s.share_path}   default: {s.default_model}   "
        f"VRAM budget: {s.vram.budget_mib} MiB - reserve {s.vram.reserve_mib} MiB "
        f"= {s.vram.budget_mib - s.vram.reserve_mib} MiB",
        "loading: stage = a verified local copy, share = read from the share; where each "
        "model's bytes are now and its last loads: invoke status",
        "",
    ]
    header = (
        "MODEL",
        "ALIASES",
        "PORT",
        "CTX",
        "NGL",
        "CPU-MOE",
        "LOAD",
        "WEIGHTS",
        "KV",
        "TOTAL",
        "VERDICT",
    )
    table = [header]
    notes: list[str] = []
    for model, (entry, est) in zip(catalog.models, rows(catalog), strict=True):
        verdict = est.verdict
        if est.source == "override":
            verdict += " (override)"
        table.append(
            (
                entry["name"],
                ",".join(entry["aliases"]) or "-",
                str(entry["port"]),
                str(entry["ctx_size"]),
                str(entry["n_gpu_layers"]),
                str(entry["n_cpu_moe"]),
                catalog.load_mode(model),
                _mib(est.weights_mib),
                _mib(est.kv_mib),
                _mib(est.total_mib),
                verdict,
            )
        )
        if est.verdict == "unknown":
            notes.append(f"{entry['name']}: no estimate — {est.reason}")
        elif est.verdict == "over budget":
            hint = (
                f"set n_cpu_moe: {est.suggested_n_cpu_moe} to fit"
                if est.suggested_n_cpu_moe is not None
                else "lower ctx_size, n_gpu_layers or cache_type"
            )
            notes.append(
                f"{entry['name']}: needs {_mib(est.total_mib)} "
                f"of {_mib(est.available_mib)} — {hint}"
            )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines)
