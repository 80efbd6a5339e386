"""The Grafana dashboard and the scrape example name only series that exist.

Grafana's own schema check can't run here (no Grafana): every panel's queries are held to the
series llamavm's sampler declares (llamavm.host.metrics.SERIES). The node_* and llamacpp:*
names are checked against a real node_exporter and llama-server in
tests/integration/test_expose.py.
"""

from __future__ import annotations

import json

import yaml

from llamavm.host import metrics
from tests.unit.fakes.dashboard import DASHBOARD, SCRAPE, SERIES_RE, dashboard_series


def test_every_panel_is_well_formed() -> None:
    data = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert data["uid"] and data["title"] and isinstance(data["schemaVersion"], int)
    cells = set()
    for panel in data["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert SERIES_RE.search(target["expr"]), target["expr"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        cell = (pos["x"], pos["y"])
        assert cell not in cells, f"{panel['title']} overlaps another panel"
        cells.add(cell)


def test_every_llamavm_series_the_dashboard_uses_is_written_by_the_sampler() -> None:
    used = {n for n in dashboard_series() if n.startswith("llamavm_")}
    assert used, "the dashboard shows llamavm series"
    assert used <= set(metrics.SERIES), used - set(metrics.SERIES)


def test_the_scrape_example_scrapes_node_exporter_and_llama_server() -> None:
    jobs = {j["job_name"]: j for j in yaml.safe_load(SCRAPE.read_text())["scrape_configs"]}
    assert set(jobs) == {"node", "llama-server"}
    assert jobs["node"]["static_configs"][0]["targets"][0].endswith(":9100")
    assert jobs["llama-server"]["authorization"]["credentials_file"]
