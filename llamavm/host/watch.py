"""Watching a model load: ready, still loading (and progressing), crashed, or stalled.

A cold load from a network share can take minutes; a crash-looping server must be given up on
in seconds. So the verdict never rests on a clock alone:

* crashed — the unit left its start (exited, or systemd is restarting it): fail at once;
* ready — /health answers 200 and systemd says active/running;
* stalled — past the expected load time (learned from recent loads) and the server process has
  made no progress (CPU time, resident memory, bytes read) for STALL_S: fail;
* too slow — past the catalog's health_timeout_s, the hard ceiling: fail;
* otherwise wait, however long past the expected time, while the load progresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: A learned expectation is never shorter than this, and is this many times the slowest load.
EXPECTED_FLOOR_S = 20.0
EXPECTED_FACTOR = 3.0
#: No progress for this long past the expected time: stalled.
STALL_S = 30.0
#: systemd must have begun the start within this long.
START_GRACE_S = 15.0


def poll_interval(elapsed_s: float) -> float:
    """How long to wait between health polls of a load `elapsed_s` old: 10 ms at first, then 2%
    of the time so far, at most 250 ms. A small model is seen healthy within 10 ms; a big load
    is not slowed by pollers taking CPU from it (under TCG, 10 ms polling by the gate and the
    transaction together cost a 1 GiB load about a third of its speed)."""
    return min(0.25, max(0.01, elapsed_s / 50))


def expected_seconds(loads: list[float], ceiling_s: float) -> float:
    """How long a load should take, from recent loads; the ceiling when there is no history."""
    if not loads:
        return ceiling_s
    return min(ceiling_s, max(EXPECTED_FLOOR_S, EXPECTED_FACTOR * max(loads)))


def process_counters(pid: int) -> tuple[int, ...] | None:
    """CPU ticks, resident pages and bytes read of `pid`; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    io = (0, 0)
    try:
        lines = dict(
            line.split(": ", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines()
        )
        io = (int(lines.get("rchar", 0)), int(lines.get("read_bytes", 0)))
    except (OSError, ValueError):
        pass
    return (int(fields[11]) + int(fields[12]), resident, *io)


@dataclass
class Sample:
    """One look at the loading unit. systemd fields are None on ticks that skip systemctl."""

    elapsed: float
    healthy: bool
    active_state: str | None = None
    sub_state: str | None = None
    invocation: str | None = None
    main_pid: int = 0
    n_restarts: int | None = None
    counters: tuple[int, ...] | None = None


@dataclass
class LoadWatch:
    expected_s: float
    ceiling_s: float
    initial_invocation: str = ""
    initial_restarts: int = 0
    stall_s: float = STALL_S
    started: bool = False
    pid: int = 0
    last_counters: tuple[int, ...] | None = None
    last_progress_at: float = 0.0
    states: list[str] = field(default_factory=list)

    def judge(self, s: Sample) -> tuple[str, str]:
        """('ready' | 'wait' | 'fail', why)."""
        if s.active_state is not None:
            if not self.started:
                new_run = bool(s.invocation) and s.invocation != self.initial_invocation
                self.started = new_run or s.active_state in ("activating", "active")
            if self.started:
                crashed = self._crashed(s)
                if crashed:
                    return "fail", crashed
            elif s.elapsed > START_GRACE_S:
                return "fail", f"systemd did not start it within {START_GRACE_S:.0f}s"
        if s.healthy and s.active_state == "active" and s.sub_state == "running":
            return "ready", ""
        if s.counters is not None and s.counters != self.last_counters:
            self.last_counters = s.counters
            self.last_progress_at = s.elapsed
        if s.elapsed > self.ceiling_s:
            return "fail", f"not healthy after {self.ceiling_s:.0f}s (its health_timeout_s)"
        if s.elapsed > self.expected_s and s.elapsed - self.last_progress_at > self.stall_s:
            return "fail", (
                f"stalled: no progress for {self.stall_s:.0f}s, past the {self.expected_s:.0f}s "
                "a load is expected to take"
            )
        return "wait", ""

    def _crashed(self, s: Sample) -> str:
        if s.n_restarts is not None and s.n_restarts > self.initial_restarts:
            return "crashed while loading, and systemd restarted it (a crash loop)"
        if s.sub_state in ("auto-restart", "failed") or s.active_state == "failed":
            return "the server exited while loading"
        if s.active_state in ("inactive", "deactivating"):
            return "the server stopped while loading"
        if s.main_pid:
            if self.pid and s.main_pid != self.pid:
                return "the server restarted while loading (new PID)"
            self.pid = s.main_pid
        return ""
