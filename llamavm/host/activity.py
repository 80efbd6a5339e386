"""What a model's server is doing, read from its /metrics (llama-server --metrics): whether it
saw requests since the last look (the idle watcher) and how many it has now (a switch's drain)."""

from __future__ import annotations

#: Counters that move with every request.
ACTIVITY_COUNTERS = (
    "llamacpp:prompt_tokens_total",
    "llamacpp:tokens_predicted_total",
    "llamacpp:n_decode_total",
)
#: Requests the server has now: in a slot, and waiting for one (with more requests than slots,
#: most of them wait).
ACTIVITY_BUSY = ("llamacpp:requests_processing", "llamacpp:requests_deferred")


def _values(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name in ACTIVITY_COUNTERS or name in ACTIVITY_BUSY:
            try:
                values[name] = float(rest.split()[0])
            except (IndexError, ValueError):
                continue
    return values


def activity(text: str) -> tuple[tuple[float, ...], int] | None:
    """(request counters, requests under way) from llama-server's /metrics text; None when
    it has none of the counters (then nobody can tell idle from busy, and nothing sleeps)."""
    values = _values(text)
    if not any(name in values for name in ACTIVITY_COUNTERS):
        return None
    return tuple(values.get(name, 0.0) for name in ACTIVITY_COUNTERS), _busy(values)


def in_flight_of(text: str) -> int:
    """Requests under way (in slots and waiting for one) from llama-server's /metrics text;
    0 when it does not say."""
    return _busy(_values(text))


def _busy(values: dict[str, float]) -> int:
    return int(sum(values.get(name, 0.0) for name in ACTIVITY_BUSY))
