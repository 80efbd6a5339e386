"""The Grafana dashboard and the Prometheus scrape example llamavm ships (docs/metrics/), and the
series names the dashboard's queries use: read by the unit tests and by the test bed's
(tests/integration/test_expose.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from llamavm import REPO_ROOT

DASHBOARD = REPO_ROOT / "docs" / "metrics" / "grafana-dashboard.json"
SCRAPE = REPO_ROOT / "docs" / "metrics" / "prometheus.yml"
SERIES_RE = re.compile(r"\b(?:llamavm_|node_|llamacpp:)[A-Za-z0-9_:]*")


def dashboard_series(path: Path = DASHBOARD) -> set[str]:
    """Every series name a query of the dashboard (panels and variables) uses."""
    data = json.loads(path.read_text())
    exprs = [t["expr"] for p in data["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in data["templating"]["list"]]
    return {name for expr in exprs for name in SERIES_RE.findall(expr)}
