"""`invoke models`: every model with its VRAM estimate and verdict, as a table or JSON."""

from __future__ import annotations

import json
from typing import Any

from llamavm.inputs.catalog import Catalog
from llamavm.inputs.vram import Estimate, admission, check_companions, estimate


def rows(
    catalog: Catalog, data: dict[str, Any] | None = None
) -> list[tuple[dict[str, Any], Estimate]]:
    """Each model's catalog entry (from `data`, default: the catalog as data) and estimate."""
    entries = (data or catalog.as_dict())["models"]
    return [
        (entry, estimate(catalog, model))
        for model, entry in zip(catalog.models, entries, strict=True)
    ]


def _admit(catalog: Catalog, found: list[tuple[dict[str, Any], Estimate]]) -> dict[str, Any]:
    """Refuse companions that do not fit together; per big model, which run beside it."""
    totals = {entry["name"]: est.total_mib for entry, est in found}
    check_companions(catalog, totals)
    return admission(catalog, totals)


def as_json(catalog: Catalog) -> str:
    data = catalog.as_dict()
    found = rows(catalog, data)
    admitted = _admit(catalog, found)
    for entry, est in found:
        entry["vram"] = est.as_dict()
        if entry["name"] in admitted:
            entry["admission"] = admitted[entry["name"]]
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
    found = rows(catalog)
    admitted = _admit(catalog, found)
    for model, (entry, est) in zip(catalog.models, found, strict=True):
        verdict = est.verdict
        if est.source == "override":
            verdict += " (override)"
        table.append(
            (
                entry["name"] + (f" (companion, {model.task})" if model.companion else ""),
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
    if catalog.companions:
        notes.append(
            "companions run beside the big model while the set fits (big + companions + "
            "reserve <= budget):"
        )
        for name, verdict in admitted.items():
            beside = ", ".join(verdict["beside"]) or "none"
            notes.append(f"  {name}: beside it {beside}")
            notes += [f"    {c} stops: {why}" for c, why in verdict["stopped"].items()]
    for model in catalog.models:
        est = next(e for entry, e in found if entry["name"] == model.name)
        if model.draft and est.draft_mib is not None:
            notes.append(
                f"{model.name}: drafts with {model.draft} ({_mib(est.draft_mib)} of its total)"
            )
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines)
