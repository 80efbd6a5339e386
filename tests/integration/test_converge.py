"""The no-op provision on the test bed: an unchanged host is skipped after its drift probe; a
hand edit, a stopped service or a model unit changed behind the transaction's back is named and
repaired by the next provision — running only the roles that manage them — which then records
again; a model added to the catalog converges only the roles that read the models."""

from __future__ import annotations

import json

import pytest

from tests.integration.helpers import catalog_with, host_run, invoke

pytestmark = pytest.mark.testbed

CONTROL_UNIT = "/etc/systemd/system/llamavm-control.service"
EXPORTER = "prometheus-node-exporter.service"


def _up_to_date(result) -> bool:
    return "testbed: up to date" in result.stdout and "no changes" in result.stdout


def test_an_unchanged_host_is_skipped_and_says_so(provisioned) -> None:
    first = invoke("provision")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr
    again = invoke("provision")
    assert again.returncode == 0, again.stderr
    assert _up_to_date(again), again.stdout[-3000:]
    assert "TASK [" not in again.stdout  # no role ran
    record = host_run("stat -c '%a %U' /var/lib/llamavm/converge.json").stdout.split()
    assert record == ["600", "root"]


def test_hand_edits_are_named_and_repaired(provisioned, models) -> None:
    assert invoke("provision").returncode == 0
    before = host_run(f"sha256sum {CONTROL_UNIT}").stdout.split()[0]
    other = next(m for m in models.models if m != models.default).unit
    host_run(
        f"echo '# edited by hand' >> {CONTROL_UNIT} && systemctl stop {EXPORTER} && "
        f"echo '# x' >> /etc/systemd/system/{other}"
    )
    result = invoke("provision")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    said = [line for line in result.stdout.splitlines() if line.startswith("llamavm: testbed:")]
    text = "\n".join(said)
    assert f"{CONTROL_UNIT}: content changed" in text, text
    assert f"unit {EXPORTER}: inactive (was active)" in text, text
    assert f"/etc/systemd/system/{other}: differs from the staged unit" in text, text
    assert any(line.startswith("llamavm: testbed: repaired (") for line in said), text
    # What drifted is control's, expose's and the model services' (the unit, the exporter, the
    # host package's drift hook): those run, base, gpu and llama_cpp do not.
    assert "only the roles that manage what drifted run: model_services, expose, control" in text
    assert "TASK [base" not in result.stdout and "TASK [llama_cpp" not in result.stdout
    assert host_run(f"sha256sum {CONTROL_UNIT}").stdout.split()[0] == before
    assert host_run(f"systemctl is-active {EXPORTER}").stdout.strip() == "active"
    assert "# x" not in host_run(f"cat /etc/systemd/system/{other}").stdout
    assert _up_to_date(invoke("provision"))


def test_full_runs_every_role_anyway(provisioned) -> None:
    result = invoke("provision", "--full")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "a full converge was asked for (--full)" in result.stdout
    assert "TASK [base" in result.stdout and "no changes" in result.stdout


def test_a_model_added_converges_only_the_roles_that_read_the_models(
    provisioned, models, tmp_path
) -> None:
    assert invoke("provision").returncode == 0
    entry = {"name": "added-late", "gguf": models.default.gguf, "port": 8031, "ctx_size": 512}
    path = catalog_with(tmp_path, [entry])
    result = invoke("provision", "--catalog", str(path))
    try:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr
        assert (
            "the inputs of model_share, model_services, expose changed (no drift): converging "
            "model_share, nfs_server, model_services, expose" in result.stdout
        ), result.stdout[-3000:]
        assert "TASK [model_services" in result.stdout and "TASK [base" not in result.stdout
        assert "TASK [control" not in result.stdout
        unit = host_run("systemctl show -p LoadState --value llamavm-model-added-late.service")
        assert unit.stdout.strip() == "loaded"
        # The control service was not restarted, and knows the new model.
        listed = host_run("curl -s http://127.0.0.1:8090/models").stdout
        assert "added-late" in [m["name"] for m in json.loads(listed)["models"]], listed
        assert _up_to_date(invoke("provision", "--catalog", str(path)))
    finally:
        back = invoke("provision")
    assert back.returncode == 0, back.stdout[-4000:] + back.stderr
    assert "(no drift): converging" in back.stdout
    gone = host_run("systemctl show -p LoadState --value llamavm-model-added-late.service")
    assert gone.stdout.strip() == "not-found"
