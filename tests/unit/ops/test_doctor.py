"""invoke doctor: each check's verdict, and the report an operator reads."""

from __future__ import annotations

import json

from llamavm.ops import doctor
from llamavm.testbed import machine


def test_testbed_running_is_ok(monkeypatch) -> None:
    monkeypatch.setattr(
        machine,
        "status",
        lambda: {"state": "running", "pid": 42, "addresses": {"host": "10.213.0.10"}},
    )
    check = doctor.check_testbed()
    assert check.status == doctor.OK
    assert "10.213.0.10" in check.detail


def test_testbed_stopped_warns_with_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(machine, "status", lambda: {"state": "stopped", "pid": None})
    check = doctor.check_testbed()
    assert check.status == doctor.WARN
    assert "invoke provision" in check.fix


def test_broken_catalog_fails(tmp_path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("settings: [")
    check = doctor.check_catalog(str(bad), None)
    assert check.status == doctor.FAIL
    assert "invalid YAML" in check.detail


def test_render_counts_and_shows_fixes() -> None:
    checks = [
        doctor.Check(doctor.OK, "python", "Python 3.11.2"),
        doctor.Check(doctor.WARN, "npm", "not found", "apt-get install npm"),
        doctor.Check(doctor.FAIL, "root", "not root", "run as root"),
    ]
    text = doctor.render(checks)
    assert "WARN  npm" in text and "-> apt-get install npm" in text
    assert "FAIL  root" in text and "-> run as root" in text
    assert "Python 3.11.2  ->" not in text  # no fix shown for OK
    assert text.rstrip().endswith("3 checks: 1 FAIL, 1 WARN")
    data = json.loads(doctor.render(checks, as_json=True))
    assert [c["status"] for c in data] == ["OK", "WARN", "FAIL"]


def test_unknown_inventory_fails_cleanly() -> None:
    checks = doctor.run("no-such-inventory", None)
    assert checks[-1].status == doctor.FAIL
    assert "not found" in checks[-1].detail
