"""`invoke status`: the per-host answers of `llamavm-switch status`, as a table."""

from __future__ import annotations

from typing import Any


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def render(results: dict[str, dict[str, Any]]) -> str:
    header = ("HOST", "MODEL", "URL", "HEALTH", "UPTIME", "LAST LOAD", "GPU MEMORY")
    rows = [header]
    problems = []
    for host, answer in results.items():
        if not answer.get("ok", True):
            problems.append(f"{host}: {answer.get('error')}")
            continue
        gpus = answer.get("gpu") or []
        gpu = ", ".join(f"{g['used_mib']}/{g['total_mib']} MiB" for g in gpus) if gpus else "no GPU"
        running = answer.get("running", [])
        if len(running) > 1:
            problems.append(f"{host}: several models running: {', '.join(running)}")
        flight = answer.get("transaction")
        if flight:
            problems.append(
                f"{host}: transaction {flight.get('tx')} ({flight.get('op')} to "
                f"{flight.get('target')}) in progress: {flight.get('phase') or 'starting'}"
            )
        active = next((m for m in answer.get("models", []) if m["name"] in running), None)
        if active is None:
            asleep = (answer.get("asleep") or {}).get("model")
            if asleep:
                idle = f"{asleep} (asleep: the next request wakes it)"
            else:
                idle = "(none, stopped)" if answer.get("stopped_by_operator") else "(none)"
            rows.append((host, idle, "-", "asleep" if asleep else "-", "-", "-", gpu))
            _companions(rows, problems, host, answer)
            continue
        health = active.get("health")
        loads = active.get("loads") or []
        rows.append(
            (
                host,
                active["name"],
                f"http://{answer.get('address', host)}:{active['port']}/",
                "ok" if health == 200 else f"HTTP {health}" if health else "down",
                _ago(active.get("uptime_s")),
                f"{loads[-1]:.2f}s" if loads else "-",
                gpu,
            )
        )
        _companions(rows, problems, host, answer)
    return "\n".join(
        [*_table(rows), "", *_table(_files(results)), "", *_table(_resources(results)), *problems]
    )


def _companions(
    rows: list[tuple[Any, ...]], problems: list[str], host: str, answer: dict[str, Any]
) -> None:
    """A row per companion that runs (under the big model's), a line per one kept stopped."""
    for companion in answer.get("companions", []):
        health = companion.get("health")
        if companion.get("state") in ("active", "activating", "reloading"):
            rows.append(
                (
                    "",
                    f"+ {companion['name']} ({companion.get('task', 'chat')} companion)",
                    f"http://{answer.get('address', host)}:{companion['port']}/",
                    "ok" if health == 200 else f"HTTP {health}" if health else "down",
                    "-",
                    "-",
                    "",
                )
            )
        elif companion.get("why_not"):
            problems.append(
                f"{host}: companion {companion['name']} stopped: {companion['why_not']}"
            )


def _table(rows: list[tuple[Any, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]


def _load(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    fetched = entry.get("read_bytes", 0)
    fetch = f"{entry.get('fetch_s', 0):.2f}s for {fetched / 2**30:.2f} GiB + " if fetched else ""
    return f"{fetch}{entry.get('load_s', 0):.2f}s load"


def _files(results: dict[str, dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Per model: how it loads, where its bytes are, its last cold and warm loads."""
    rows: list[tuple[Any, ...]] = [("HOST", "MODEL", "LOAD", "FILE", "LAST COLD", "LAST WARM")]
    for host, answer in results.items():
        for model in answer.get("models", []) if answer.get("ok", True) else []:
            rows.append(
                (
                    host,
                    model["name"],
                    model.get("load", "-"),
                    model.get("file", "-"),
                    _load(model.get("last_cold")),
                    _load(model.get("last_warm")),
                )
            )
    return rows


def _resources(results: dict[str, dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Per host: CPU load, memory, the serving model's process, and each GPU."""
    rows: list[tuple[Any, ...]] = [("HOST", "CPU LOAD", "RAM", "MODEL PROCESS", "GPU")]
    for host, answer in results.items():
        if not answer.get("ok", True):
            continue
        system = answer.get("system") or {}
        load = system.get("load") or []
        cpu = f"{load[0]:.2f} / {system.get('cpus')} CPUs" if load else "-"
        total, free = system.get("mem_total_mib"), system.get("mem_available_mib")
        ram = f"{(total - free) / 1024:.1f}/{total / 1024:.1f} GiB used" if total and free else "-"
        running = answer.get("running", [])
        active = next((m for m in answer.get("models", []) if m["name"] in running), {})
        process = (
            f"{active['name']}: {active['rss_mib']} MiB RSS, {active.get('cpu_s', 0):.0f} CPU s"
            if "rss_mib" in active
            else "-"
        )
        gpus = answer.get("gpus")
        rows.append((host, cpu, ram, process, _gpus(gpus)))
    return rows


def _gpus(gpus: list[dict[str, Any]] | None) -> str:
    if gpus is None:
        return "no GPU (nvidia-smi not answering)"
    parts = []
    for g in gpus:
        bits = [f"{g['name']}: {g['used_mib']}/{g['total_mib']} MiB"]
        for key, fmt in (("utilization_pct", "{:.0f}%"), ("temperature_c", "{:.0f}°C"),
                         ("power_w", "{:.0f} W")):  # fmt: skip
            if g.get(key) is not None:
                bits.append(fmt.format(g[key]))
        parts.append(" ".join(bits))
    return "; ".join(parts) or "none"
