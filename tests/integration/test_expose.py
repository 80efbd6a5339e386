"""The model host's firewall and metrics, from the LAN client's namespace (the expose role).

Only SSH, the serving model's port and node_exporter are open; the switch moves the model port
in its own transaction, and a rolled-back switch leaves the old rule set. node_exporter serves
llamavm's and the GPU's series to the LAN. The test bed has no GPU: where a test needs GPU
series, a recorded nvidia-smi answer (tests/fixtures/nvidia-smi) stands in for the driver —
the one seam faked here; the sampler, node_exporter and the scrape are real.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamavm import REPO_ROOT
from llamavm.inputs import catalog
from llamavm.testbed import config, machine
from tests.integration.helpers import (
    INVOKE,
    STUB_MARK,
    client_curl,
    host_run,
    http_code,
    invoke,
    set_failpoints,
    wait_for,
)
from tests.unit.fakes.dashboard import dashboard_series

pytestmark = pytest.mark.testbed

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi"
NODE_EXPORTER = 9100


def _other(models: catalog.Catalog) -> catalog.Model:
    return next(m for m in models.models if m != models.default)


def _open_ports() -> list[int]:
    answer = host_run("nft -j list set inet llamavm model_ports")
    assert answer.returncode == 0, answer.stderr
    found = next(i["set"] for i in json.loads(answer.stdout)["nftables"] if "set" in i)
    return sorted(found.get("elem", []))


def _health(host: str, model: catalog.Model) -> int | None:
    return http_code(f"http://{host}:{model.port}/health")


def test_an_inactive_models_port_is_refused_even_with_a_listener(
    serving_default, models, host
) -> None:
    other = _other(models)
    listener = "llamavm-it-listener"
    started = host_run(
        f"systemd-run --unit {listener} -p DynamicUser=yes "
        f"python3 -m http.server {other.port} --bind 0.0.0.0"
    )
    assert started.returncode == 0, started.stderr
    try:
        wait_for(
            lambda: (
                host_run(f"curl -s -o /dev/null http://127.0.0.1:{other.port}/").returncode == 0
            ),
            20,
            "the stand-in listener",
        )
        refused = client_curl(f"http://{host}:{other.port}/", timeout=5)
        assert refused.returncode == 7, refused.stdout + refused.stderr  # connection refused
        assert _health(host, serving_default) == 200
        assert http_code(f"http://{host}:{NODE_EXPORTER}/metrics") == 200
        assert _open_ports() == [serving_default.port]
    finally:
        host_run(f"systemctl stop {listener}")


def test_the_switch_moves_the_open_port(serving_default, models, host) -> None:
    other = _other(models)
    result = invoke("switch", "--model", other.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _open_ports() == [other.port]
    assert _health(host, other) == 200
    assert _health(host, serving_default) is None
    result = invoke("switch", "--model", serving_default.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _open_ports() == [serving_default.port]


@pytest.mark.parametrize("point", ["in_verify", "before_expose"])
def test_a_rolled_back_switch_leaves_the_old_rule_set(serving_default, models, host, point) -> None:
    set_failpoints({point: {"raise": f"injected at {point}"}})
    result = invoke("switch", "--model", _other(models).name)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{serving_default.name} is serving again" in result.stdout + result.stderr
    assert _open_ports() == [serving_default.port]
    assert _health(host, serving_default) == 200


def test_a_transaction_killed_before_it_opened_the_port_is_finished_by_recover(
    serving_default, models, host
) -> None:
    other = _other(models)
    set_failpoints({"before_expose": {"kill": True}})
    result = invoke("switch", "--model", other.name)
    # The new model was healthy and verified; recover verifies it again and opens its port.
    assert result.returncode in (0, 1), result.stdout + result.stderr
    wait_for(lambda: _health(host, other) == 200 or _health(host, serving_default) == 200, 60,
             "a model reachable from the LAN after recover")  # fmt: skip
    serving = other if _health(host, other) == 200 else serving_default
    assert _open_ports() == [serving.port]


def test_stop_closes_the_port_and_a_switch_opens_it(serving_default, models, host) -> None:
    assert invoke("stop").returncode == 0
    assert _open_ports() == []
    result = invoke("switch", "--model", serving_default.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _open_ports() == [serving_default.port]
    assert _health(host, serving_default) == 200


def _scrape(host: str) -> dict[str, list]:
    answer = client_curl(f"http://{host}:{NODE_EXPORTER}/metrics")
    assert answer.returncode == 0, answer.stderr
    body, code = answer.stdout.rsplit("\n", 1)
    assert code == "200"
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


@contextlib.contextmanager
def _recorded_gpu() -> Iterator[None]:
    """nvidia-smi on the test bed answers with a recorded H100 sample (a busy card: a switch
    meanwhile waits its 30 s for the memory to come back)."""
    answer = (FIXTURES / "h100-busy.csv").read_text()
    script = f"#!/bin/sh\n# {STUB_MARK}\nprintf '%s' {shlex.quote(answer)}\n"
    put = host_run(
        f"printf '%s' {shlex.quote(script)} > /usr/local/bin/nvidia-smi && "
        "chmod 0755 /usr/local/bin/nvidia-smi"
    )
    assert put.returncode == 0, put.stderr
    try:
        yield
    finally:
        host_run("rm -f /usr/local/bin/nvidia-smi && systemctl start llamavm-metrics.service")


@pytest.fixture
def recorded_gpu(provisioned) -> Iterator[None]:
    with _recorded_gpu():
        yield


def test_node_exporter_serves_llamavm_and_gpu_series_to_the_lan(
    serving_default, models, host
) -> None:
    # Real switches to count, before the recorded card (whose memory never comes back) is in.
    for name in (_other(models).name, serving_default.name):
        assert invoke("switch", "--model", name).returncode == 0
    with _recorded_gpu():
        sampled = host_run("systemctl start llamavm-metrics.service")
        assert sampled.returncode == 0, (
            sampled.stderr
            + host_run("journalctl -u llamavm-metrics.service -n 20 --no-pager").stdout
        )
        series = _scrape(host)
    assert [s.value for s in series["llamavm_gpu_up"]] == [1]
    used = series["llamavm_gpu_memory_used_bytes"][0]
    assert used.value == 71234 * 2**20 and used.labels["gpu"] == "0"
    assert series["llamavm_gpu_power_watts"][0].value == pytest.approx(612.45)
    active = {s.labels["model"]: s.value for s in series["llamavm_model_active"]}
    assert active == {m.name: float(m == serving_default) for m in models.models}
    switches = {
        (s.labels["op"], s.labels["result"]): s.value for s in series["llamavm_transactions_total"]
    }
    assert switches.get(("switch", "ok"), 0) + switches.get(("switch", "unchanged"), 0) >= 1
    assert "node_cpu_seconds_total" in series and "node_memory_MemAvailable_bytes" in series
    # Every series the Grafana dashboard queries from node_exporter is there.
    wanted = {n for n in dashboard_series() if not n.startswith("llamacpp:")}
    missing = {n for n in wanted if n not in series}
    # the last switch's timings and the process series need a switch / a running server: both hold
    assert not missing, missing


def test_an_nvidia_smi_that_answers_nonsense_stops_provision_before_it_builds(
    serving_default, recorded_gpu, host
) -> None:
    # The recorded stub answers every query with its whole CSV row, never a bare compute_cap.
    result = invoke("provision")
    assert result.returncode != 0
    assert "compute_cap" in result.stdout and "llama_cpp_backend: cpu" in result.stdout
    assert "Configure and compile" not in result.stdout
    assert http_code(f"http://{host}:{serving_default.port}/health") == 200


def test_llama_server_metrics_are_scrapeable_with_the_dashboards_names(
    serving_default, host
) -> None:
    answer = client_curl(f"http://{host}:{serving_default.port}/metrics")
    assert answer.returncode == 0, answer.stderr
    body, code = answer.stdout.rsplit("\n", 1)
    assert code == "200", body
    names = {s.name for f in text_string_to_metric_families(body) for s in f.samples}
    wanted = {n for n in dashboard_series() if n.startswith("llamacpp:")}
    assert wanted and wanted <= names, wanted - names


def test_without_a_gpu_the_sampler_says_so(serving_default, host) -> None:
    assert host_run("command -v nvidia-smi").returncode != 0
    assert host_run("systemctl start llamavm-metrics.service").returncode == 0
    series = _scrape(host)
    assert [s.value for s in series["llamavm_gpu_up"]] == [0]
    assert "llamavm_gpu_memory_used_bytes" not in series


def test_the_sampler_runs_unprivileged_on_a_timer(provisioned) -> None:
    shown = host_run(
        "systemctl show -p User -p NoNewPrivileges -p ProtectSystem llamavm-metrics.service; "
        "systemctl is-active llamavm-metrics.timer prometheus-node-exporter llamavm-firewall"
    ).stdout.split()
    assert "User=prometheus" in shown and "NoNewPrivileges=yes" in shown
    assert "ProtectSystem=strict" in shown
    assert shown[-3:] == ["active", "active", "active"]
    assert host_run("stat -c '%a %U' /etc/llamavm/firewall.nft").stdout.split() == ["600", "root"]


def test_status_shows_cpu_ram_and_gpu(serving_default) -> None:
    result = invoke("status", "--json")
    assert result.returncode == 0, result.stderr
    answer = next(iter(json.loads(result.stdout).values()))
    system = answer["system"]
    assert system["cpus"] >= 1 and 0 < system["mem_available_mib"] <= system["mem_total_mib"]
    assert answer["firewall"] == {"active": True, "open": [serving_default.port]}
    entry = next(m for m in answer["models"] if m["name"] == serving_default.name)
    assert entry["rss_mib"] > 0
    table = invoke("status").stdout
    assert "CPU LOAD" in table and "GiB used" in table and "no GPU" in table


# --- the front door -----------------------------------------------------------------------------

FRONT_DOOR = 8443


def _front(host: str, path: str = "/v1/models", *args: str, timeout: float = 30):
    """(HTTP status or None, body) of a request through the front door from the LAN."""
    answer = client_curl(f"http://{host}:{FRONT_DOOR}{path}", *args, timeout=timeout)
    if answer.returncode != 0:
        return None, answer.stderr
    body, code = answer.stdout.rsplit("\n", 1)
    return int(code), body


def _served_model(host: str) -> str:
    code, body = _front(host)
    assert code == 200, body
    return json.loads(body)["data"][0]["id"]


def test_the_front_door_url_stays_the_same_across_a_switch(serving_default, models, host) -> None:
    other = _other(models)
    assert _served_model(host) == serving_default.name
    assert invoke("switch", "--model", other.name).returncode == 0
    assert _served_model(host) == other.name
    assert invoke("switch", "--model", serving_default.name).returncode == 0
    assert _served_model(host) == serving_default.name
    # the internal port it proxies to is not reachable from the LAN
    internal = client_curl(f"http://{host}:8400/v1/models", timeout=5)
    assert internal.returncode == 7, internal.stdout


def test_a_request_during_a_switch_waits_and_gets_the_new_model(
    serving_default, models, host
) -> None:
    other = _other(models)
    set_failpoints({"after_stop": {"sleep": 4}})
    switch = subprocess.Popen(
        [str(INVOKE), "switch", "--model", other.name],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: _health(host, serving_default) is None, 60, "the old model stopped")
        began = time.monotonic()
        code, body = _front(host, timeout=90)
        waited = time.monotonic() - began
        assert code == 200, body
        assert json.loads(body)["data"][0]["id"] == other.name
        assert waited > 1, "it answered only once the new model was exposed"
    finally:
        output, _ = switch.communicate(timeout=300)
    assert switch.returncode == 0, output
    assert "front door: new requests wait" in output


STREAM = r"""
import http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=120)
body = {"stream": True, "max_tokens": int(sys.argv[3]), "ignore_eos": True,
        "messages": [{"role": "user", "content": "Tell me a long story."}]}
conn.request("POST", "/v1/chat/completions", json.dumps(body),
             {"Content-Type": "application/json"})
answer = conn.getresponse()
print("status", answer.status, flush=True)
chunks, done = 0, False
for line in answer:
    if line.startswith(b"data: "):
        if line.strip() == b"data: [DONE]":
            done = True
            break
        chunks += 1
print("chunks", chunks, "done", done, flush=True)
"""


def test_a_stream_through_the_front_door_finishes_before_the_switch_stops_its_model(
    serving_default, models, host
) -> None:
    other = _other(models)
    tokens = 900
    ns = config.load_config().lan.ns_client
    stream = subprocess.Popen(
        ["ip", "netns", "exec", ns, "python3", "-c", STREAM, host, str(FRONT_DOOR), str(tokens)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert stream.stdout.readline().split() == ["status", "200"]
        result = invoke("switch", "--model", other.name)
    finally:
        rest, _ = stream.communicate(timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    words = rest.split()
    assert words[:2] == ["chunks", words[1]] and words[2:] == ["done", "True"], rest
    assert int(words[1]) >= tokens - 1
    assert _served_model(host) == other.name


@pytest.fixture(scope="module")
def keyed_catalog(provisioned, tmp_path_factory) -> Iterator[tuple[catalog.Catalog, str]]:
    """The test bed with the key policy on and a 3 s front-door wait; (catalog, provision's
    output). Provisioned back to the test bed's own catalog afterwards."""
    from tests.integration.helpers import keyed_testbed

    with keyed_testbed(tmp_path_factory.mktemp("keyed"), wait_s=3) as keyed:
        yield keyed


def test_the_key_guards_the_api_through_the_front_door_and_direct(keyed_catalog, host) -> None:
    cat, _ = keyed_catalog
    model = cat.default
    key = host_run("cat /etc/llamavm/api-key").stdout.strip()
    assert len(key) >= 32
    right, wrong = f"Authorization: Bearer {key}", "Authorization: Bearer not-the-key"
    direct = f"http://{host}:{model.port}"
    for base in (direct, f"http://{host}:{FRONT_DOOR}"):
        assert http_code(f"{base}/v1/models") == 401, base
        assert http_code(f"{base}/v1/models", "-H", wrong) == 401, base
        assert http_code(f"{base}/v1/models", "-H", right) == 200, base
        # public by design (documented): health, and the web UI's page (it asks for the key)
        assert http_code(f"{base}/health") == 200, base
        assert http_code(f"{base}/") == 200, base
    # llama-server's metrics want the key too
    assert http_code(f"{direct}/metrics") == 401
    assert http_code(f"{direct}/metrics", "-H", right) == 200


def test_the_key_appears_nowhere_it_could_leak(keyed_catalog, models) -> None:
    cat, provision_output = keyed_catalog
    key = host_run("cat /etc/llamavm/api-key").stdout.strip()
    switched = invoke("switch", "--model", _other(models).name, "--catalog", str(cat.path))
    back = invoke("switch", "--model", cat.default.name, "--catalog", str(cat.path))
    status_output = invoke("status", "--catalog", str(cat.path))
    places = {
        "ansible and invoke provision output": provision_output,
        "invoke switch output": switched.stdout + switched.stderr + back.stdout + back.stderr,
        "invoke status output": status_output.stdout + status_output.stderr,
        "ps": host_run("ps -eo args").stdout,
        "ps with environments": host_run("ps -e e -o args").stdout,
        "unit files": host_run(
            "systemctl cat 'llamavm-*' caddy prometheus-node-exporter 2>/dev/null"
        ).stdout,
        "the journal": host_run("journalctl --no-pager -o cat").stdout,
        "world-readable files in /etc": host_run(
            'grep -rlsF -- "$(cat /etc/llamavm/api-key)" /etc --exclude=api-key || true'
        ).stdout,
    }
    assert switched.returncode == 0 and back.returncode == 0
    for where, text in places.items():
        assert key not in text, f"the API key is in {where}"


def test_rotating_the_key_changes_what_the_api_accepts(keyed_catalog, host) -> None:
    cat, _ = keyed_catalog
    old = host_run("cat /etc/llamavm/api-key").stdout.strip()
    result = invoke("key.rotate", "--catalog", str(cat.path))
    assert result.returncode == 0, result.stdout + result.stderr
    new = host_run("cat /etc/llamavm/api-key").stdout.strip()
    assert new != old and new not in result.stdout + result.stderr
    assert host_run("stat -c '%a %U' /etc/llamavm/api-key").stdout.split() == ["600", "root"]
    for base in (f"http://{host}:{cat.default.port}", f"http://{host}:{FRONT_DOOR}"):
        assert http_code(f"{base}/v1/models", "-H", f"Authorization: Bearer {old}") == 401
        assert http_code(f"{base}/v1/models", "-H", f"Authorization: Bearer {new}") == 200
    shown = invoke("key.rotate", "--show", "--catalog", str(cat.path))
    assert shown.returncode == 0
    assert host_run("cat /etc/llamavm/api-key").stdout.strip() in shown.stdout


def test_with_no_model_the_front_door_answers_503_with_retry_after(keyed_catalog, host) -> None:
    cat, _ = keyed_catalog
    assert invoke("stop").returncode == 0
    try:
        began = time.monotonic()
        answer = client_curl(f"http://{host}:{FRONT_DOOR}/v1/models", "-i", timeout=30)
        waited = time.monotonic() - began
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.rsplit("\n", 1)[-1] == "503"
        assert "Retry-After: 5" in answer.stdout
        assert 2.5 <= waited < 15, waited  # the catalog's wait_s (3 s), then a clear answer
    finally:
        result = invoke("switch", "--model", cat.default.name, "--catalog", str(cat.path))
        assert result.returncode == 0, result.stdout + result.stderr


BROWSER = Path(__file__).resolve().parent / "browser" / "chat.py"
#: Where the browser test leaves its screenshot (kept for a human to look at).
SHOTS = Path(os.environ.get("LLAMAVM_ARTIFACTS", "/var/tmp/llamavm-test-artifacts"))


def test_the_web_ui_chats_through_the_front_door_in_a_real_browser(serving_default, host) -> None:
    for tool in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not Path(tool).exists():
            pytest.skip(f"{tool} is missing (scripts/bootstrap test installs it)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / "web-ui-through-the-front-door.png"
    shot.unlink(missing_ok=True)
    ns = config.load_config().lan.ns_client
    machine.client_run(["ip", "link", "set", "lo", "up"])  # chromedriver listens on localhost
    # With the key policy on, the page asks for the key: the browser types it in, as a user.
    key = host_run("cat /etc/llamavm/api-key 2>/dev/null || true").stdout.strip()
    run = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, str(BROWSER),
         f"http://{host}:{FRONT_DOOR}/", str(shot), "Hello through the front door"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "LLAMAVM_UI_KEY": key},
    )  # fmt: skip
    assert run.returncode == 0, f"{run.stderr[-3000:]}\n(screenshot: {shot})"
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["reply"].strip(), answer
    # A blank page (the app never started) makes a PNG of a few KiB.
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000, f"{shot} looks blank"
