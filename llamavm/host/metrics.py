"""`llamavm-switch metrics`: llamavm's and the GPU's series for node_exporter.

A systemd timer (the expose role) runs this every `metrics.interval_s`; it writes the
Prometheus text format to node_exporter's textfile collector directory, atomically (a reader
never sees half a file). Every series is named here, in SERIES; the Grafana dashboard and the
scrape example in `docs/metrics/` use only these names (a test holds them to it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from llamavm.host import gpu, http, store
from llamavm.host.contract import Contract
from llamavm.host.runtime import UnitState
from llamavm.host.systemd import Systemd

MIB = 1 << 20

#: name -> (type, help). The only series this module writes.
SERIES: dict[str, tuple[str, str]] = {
    "llamavm_sampler_timestamp_seconds": ("gauge", "When this sample was taken (Unix time)."),
    "llamavm_gpu_up": ("gauge", "1 when nvidia-smi answered, 0 when it is missing or failed."),
    "llamavm_gpu_info": ("gauge", "One per GPU, always 1: its index, UUID and name."),
    "llamavm_gpu_utilization_ratio": ("gauge", "GPU utilisation, 0-1 (nvidia-smi)."),
    "llamavm_gpu_memory_used_bytes": ("gauge", "GPU memory in use (nvidia-smi)."),
    "llamavm_gpu_memory_total_bytes": ("gauge", "GPU memory in all (nvidia-smi)."),
    "llamavm_gpu_temperature_celsius": ("gauge", "GPU core temperature (nvidia-smi)."),
    "llamavm_gpu_power_watts": ("gauge", "GPU power draw (nvidia-smi)."),
    "llamavm_gpu_power_limit_watts": ("gauge", "GPU power limit (nvidia-smi)."),
    "llamavm_model_info": ("gauge", "One per catalog model, always 1: its port and loading mode."),
    "llamavm_model_active": ("gauge", "1 for the model whose server runs, else 0."),
    "llamavm_model_asleep": (
        "gauge",
        "1 for the model stopped for idleness (its idle_unload_s) that the next request wakes.",
    ),
    "llamavm_model_healthy": ("gauge", "1 when the model's /health answers 200, else 0."),
    "llamavm_companion_active": (
        "gauge",
        "1 for a companion (companion: true) whose server runs beside the big model, else 0.",
    ),
    "llamavm_companion_healthy": ("gauge", "1 when the companion's /health answers 200, else 0."),
    "llamavm_model_vram_estimate_bytes": ("gauge", "The catalog's VRAM estimate of the model."),
    "llamavm_model_last_load_seconds": ("gauge", "The model's last load time (start to healthy)."),
    "llamavm_model_process_resident_bytes": ("gauge", "Resident memory of the model's server."),
    "llamavm_model_process_cpu_seconds_total": ("counter", "CPU time of the model's server."),
    "llamavm_transactions_total": (
        "counter",
        "Finished transactions by operation (switch, stop, apply, boot) and result.",
    ),
    "llamavm_transaction_in_progress": ("gauge", "1 while a transaction holds the switch."),
    "llamavm_last_switch_timestamp_seconds": ("gauge", "When the last switch ended."),
    "llamavm_last_switch_success": ("gauge", "1 when the last switch served its model."),
    "llamavm_last_switch_seconds": ("gauge", "The last successful switch, end to end."),
    "llamavm_last_switch_load_seconds": ("gauge", "The last successful switch's model load."),
    "llamavm_last_switch_downtime_seconds": (
        "gauge",
        "The last successful switch's downtime (old model stopped to new model healthy).",
    ),
}


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


class Writer:
    """Prometheus text format, each series' HELP/TYPE once, before its first sample."""

    def __init__(self) -> None:
        self.samples: dict[str, list[str]] = {}

    def add(self, series: str, value: float | None, /, **labels: object) -> None:
        if series not in SERIES:
            raise KeyError(f"{series} is not in metrics.SERIES")
        if value is None:
            return
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        self.samples.setdefault(series, []).append(
            f"{series}{{{text}}} {_number(value)}" if text else f"{series} {_number(value)}"
        )

    def text(self) -> str:
        lines = []
        for name, samples in self.samples.items():
            kind, help_text = SERIES[name]
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


def gpu_series(out: Writer, gpus: list[dict[str, Any]] | None) -> None:
    out.add("llamavm_gpu_up", 0 if gpus is None else 1)
    for g in gpus or []:
        labels = {"gpu": g["index"], "uuid": g["uuid"]}
        out.add("llamavm_gpu_info", 1, **labels, name=g["name"])
        pct = g.get("utilization_pct")
        out.add("llamavm_gpu_utilization_ratio", None if pct is None else pct / 100, **labels)
        out.add("llamavm_gpu_memory_used_bytes", g["used_mib"] * MIB, **labels)
        out.add("llamavm_gpu_memory_total_bytes", g["total_mib"] * MIB, **labels)
        out.add("llamavm_gpu_temperature_celsius", g.get("temperature_c"), **labels)
        out.add("llamavm_gpu_power_watts", g.get("power_w"), **labels)
        out.add("llamavm_gpu_power_limit_watts", g.get("power_limit_w"), **labels)


def process_stats(pid: int) -> tuple[float, float] | None:
    """(resident bytes, CPU seconds) of a process, from /proc; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return resident * os.sysconf("SC_PAGE_SIZE"), cpu


def collect(
    contract: Contract,
    systemd: Systemd,
    gpus: list[dict[str, Any]] | None,
    health: Callable[[str], int | None] = http.status_of,
    now: Callable[[], float] = time.time,
) -> str:
    """Every series, as the text node_exporter reads; the model servers as the contract's
    runtime sees them (systemd units, or the containers of a Compose project)."""
    from llamavm.host.transaction import Host  # the runtime seam (it imports this module)

    runtime = Host(contract, systemd=systemd).runtime
    # A container's PID is the engine's, not in this process's PID namespace: its /proc entry
    # would be another process's.
    own_pids = contract.runtime is None or contract.runtime.kind == "systemd"
    out = Writer()
    out.add("llamavm_sampler_timestamp_seconds", round(now(), 3))
    gpu_series(out, gpus)
    state = store.load_state(contract.paths.state, repair=False)
    units = runtime.show(contract.models)
    asleep = (state["asleep"] or {}).get("model")
    for model in contract.models:
        unit = units.get(model.unit) or UnitState()
        active = unit.active == "active"
        labels = {"model": model.name}
        out.add("llamavm_model_info", 1, **labels, port=model.port, load=model.load)
        out.add("llamavm_model_active", int(active), **labels)
        out.add("llamavm_model_asleep", int(model.name == asleep and not active), **labels)
        out.add("llamavm_model_healthy", int(active and health(model.health_url) == 200), **labels)
        estimate = model.vram.get("total_mib")
        out.add(
            "llamavm_model_vram_estimate_bytes",
            None if not isinstance(estimate, int | float) else round(estimate * MIB),
            **labels,
        )
        loads = state["loads"].get(model.name) or []
        out.add("llamavm_model_last_load_seconds", loads[-1] if loads else None, **labels)
        stats = process_stats(unit.pid) if active and unit.pid and own_pids else None
        if stats:
            out.add("llamavm_model_process_resident_bytes", stats[0], **labels)
            out.add("llamavm_model_process_cpu_seconds_total", round(stats[1], 2), **labels)
    if contract.companions:
        beside = runtime.states(contract.companions)
        for model in contract.companions:
            active = beside.get(model.unit) == "active"
            labels = {"model": model.name, "task": model.task}
            out.add("llamavm_companion_active", int(active), **labels)
            healthy = active and health(model.health_url) == 200
            out.add("llamavm_companion_healthy", int(healthy), **labels)
    counters = store.read_counters(contract.paths.counters)
    for op, results in sorted(counters["transactions"].items()):
        for result, count in sorted(results.items()):
            out.add("llamavm_transactions_total", count, op=op, result=result)
    out.add("llamavm_transaction_in_progress", int(bool(state.get("pending"))))
    last, last_ok = counters["last_switch"], counters["last_ok_switch"]
    if last:
        out.add("llamavm_last_switch_timestamp_seconds", last.get("at"))
        out.add("llamavm_last_switch_success", int(last.get("result") == "ok"))
    if last_ok:
        for key, name in (
            ("switch_seconds", "llamavm_last_switch_seconds"),
            ("load_seconds", "llamavm_last_switch_load_seconds"),
            ("downtime_seconds", "llamavm_last_switch_downtime_seconds"),
        ):
            out.add(name, last_ok.get(key))
    return out.text()


def write(contract: Contract, systemd: Systemd) -> Path | None:
    """One sample into the textfile collector's directory (None: metrics are off)."""
    if contract.metrics is None:
        return None
    text = collect(contract, systemd, gpu.sample())
    # node_exporter never reads half a file; a lost sample is rewritten in seconds (no fsync).
    store.write_text(contract.metrics.textfile, text, 0o644, durable=False)
    return contract.metrics.textfile


def names(text: Iterable[str]) -> set[str]:
    """The series names in Prometheus text (comments skipped)."""
    found = set()
    for line in text:
        if line and not line.startswith("#"):
            found.add(line.split("{", 1)[0].split(" ", 1)[0])
    return found
