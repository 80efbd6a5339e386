"""The control service on the test bed, from the LAN client's namespace: every endpoint with and
without the key, a switch with server-sent progress, concurrent switches through the API and
the CLI, the `openai` client through the routing endpoint, a burst naming two models, and the
picker page in headless Chromium. The module runs with the key policy on (and routing, as the
test bed's catalog has it), then provisions the test bed back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from llamavm import REPO_ROOT
from llamavm.inputs import catalog, inventory
from llamavm.ops import control_api, fleet
from llamavm.testbed import config, machine
from tests.integration.helpers import (
    CONTROL_ENDPOINTS,
    host_run,
    http_code,
    invoke,
    keyed_testbed,
    sampled,
    wait_for,
)
from tests.integration.helpers import (
    api_call as _call,
)
from tests.integration.helpers import (
    api_post as _post,
)

pytestmark = pytest.mark.testbed

HERE = Path(__file__).resolve().parent
SHOTS = Path(os.environ.get("LLAMAVM_TEST_ARTIFACTS", "/var/tmp/llamavm-test-artifacts"))


def _answers() -> dict[str, dict]:
    entries = yaml.safe_load((REPO_ROOT / "config" / "tiny-models.yaml").read_text())
    return {e["name"]: e for e in entries}


@pytest.fixture(scope="module")
def keyed(provisioned, tmp_path_factory) -> Iterator[tuple[catalog.Catalog, str]]:
    """The test bed with the key policy on: (catalog, key). Provisioned back afterwards."""
    with keyed_testbed(tmp_path_factory.mktemp("control")) as (cat, _):
        key = host_run("cat /etc/llamavm/api-key").stdout.strip()
        assert len(key) >= 32
        yield cat, key


def _base(host: str, cat: catalog.Catalog) -> str:
    return f"http://{host}:{cat.settings.control.port}"


def _serving(host: str, cat: catalog.Catalog, key: str) -> str | None:
    code, body = _call(f"{_base(host, cat)}/status", key)
    assert code == 200, body
    return json.loads(body)["active"]


def _servers() -> int:
    return int(host_run("pgrep -c -x llama-server || true").stdout.strip() or 0)


def test_every_endpoint_wants_the_key_and_works_with_it(keyed, host) -> None:
    cat, key = keyed
    base = _base(host, cat)
    for method, path, body in CONTROL_ENDPOINTS:
        for given in (None, "not-the-key"):
            if method == "GET":
                code, _ = _call(base + path, given)
            else:
                code, _ = _post(base + path, given, body)
            assert code == 401, (path, given)
        code, answer = _call(base + path, key) if method == "GET" else _post(base + path, key, body)
        assert code == 200, (path, answer)
    assert _serving(host, cat, key) is None  # the last one was /stop
    assert _servers() == 0
    # public by design (documented): health, the picker page and the API docs
    for path in ("/health", "/", "/docs", "/openapi.json"):
        assert http_code(base + path) == 200, path
    assert _post(f"{base}/switch", key, {"model": "qwen"})[0] == 200


def test_the_key_is_in_no_unit_file_and_no_command_line(keyed) -> None:
    _, key = keyed
    units = host_run("systemctl cat llamavm-control.service llamavm-switchd.socket").stdout
    assert "LoadCredential=api-key:" in units and key not in units
    assert key not in host_run("ps -eo args").stdout
    assert key not in host_run("journalctl -u llamavm-control --no-pager -n 200").stdout
    user = host_run("systemctl show -p User --value llamavm-control.service").stdout.strip()
    assert user == "llamavm-control"
    pid = host_run("systemctl show -p MainPID --value llamavm-control.service").stdout.strip()
    assert host_run(f"ps -o user= -p {pid}").stdout.strip() == "llamavm-control"


def test_a_switch_through_the_api_streams_its_progress(keyed, host) -> None:
    cat, key = keyed
    target = "gpt-oss-120b" if _serving(host, cat, key) != "gpt-oss-120b" else "qwen3-coder-30b"
    code, body = _post(
        f"{_base(host, cat)}/switch?stream=true", key, {"model": target}, "-N",
        "-H", "Accept: text/event-stream",
    )  # fmt: skip
    assert code == 200, body
    events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((lines["event"], json.loads(lines["data"])))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "outcome" and kinds.count("progress") >= 2, kinds
    assert events[-1][1]["ok"] is True and events[-1][1]["model"] == target
    assert _serving(host, cat, key) == target


def test_a_bad_switch_request_harms_nothing(keyed, host) -> None:
    cat, key = keyed
    before = _serving(host, cat, key)
    base = _base(host, cat)
    assert _post(f"{base}/switch", key, {"model": "no-such-model"})[0] == 404
    assert _post(f"{base}/switch", key, {"model": ["qwen"]})[0] == 422
    assert _call(f"{base}/switch", key, "-X", "POST", "-d", "{not json")[0] == 422
    assert _post(f"{base}/v1/chat/completions", key, {"model": "gpt-oss:extreme"})[0] == 400
    assert _serving(host, cat, key) == before


def _api_switch(base: str, key: str, name: str) -> subprocess.Popen:
    """POST /switch from the LAN client, in the background; its stdout is the HTTP status."""
    ns = config.load_config().lan.ns_client
    argv = [
        "ip", "netns", "exec", ns, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
        "--max-time", "600", "-X", "POST", "-H", f"Authorization: Bearer {key}",
        "-H", "Content-Type: application/json", "-d", json.dumps({"model": name}),
        f"{base}/switch",
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def test_concurrent_api_and_cli_switches_leave_exactly_one_model(keyed, host) -> None:
    cat, key = keyed
    base = _base(host, cat)
    for api_names, cli_name in ((("qwen", "gpt-oss"), "gpt-oss"), (("gpt-oss", "qwen"), "qwen")):
        api = [_api_switch(base, key, name) for name in api_names]
        cli = invoke("switch", "--model", cli_name, "--catalog", str(cat.path))
        codes = [p.communicate(timeout=600)[0] for p in api]
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert codes == ["200", "200"], codes
        serving = _serving(host, cat, key)
        assert serving in ("qwen3-coder-30b", "gpt-oss-120b")
        assert _servers() == 1
        model = cat.resolve(serving)
        # and what serves answers, through the open port
        assert http_code(f"http://{host}:{model.port}/health") == 200


def test_one_root_helper_answers_every_request_and_a_stopped_one_comes_back(keyed, host) -> None:
    """The helper starts once (its socket's first connection) and answers the requests after
    it in the same process, as root; stopped (a provision's handler stops it), the next request
    starts it again and nothing fails."""
    cat, key = keyed

    def helper_pid() -> str:
        pid = host_run("systemctl show -p MainPID --value llamavm-switchd.service").stdout
        return pid.strip()

    _serving(host, cat, key)
    first = helper_pid()
    assert first != "0"
    assert host_run(f"ps -o user= -p {first}").stdout.strip() == "root"
    for _ in range(3):
        _serving(host, cat, key)
    assert helper_pid() == first
    assert host_run("systemctl list-units --no-legend 'llamavm-switchd@*'").stdout.strip() == ""
    host_run("systemctl stop llamavm-switchd.service")
    assert _serving(host, cat, key) in ("qwen3-coder-30b", "gpt-oss-120b", None)
    assert helper_pid() not in ("0", first)
    assert host_run("systemctl is-active llamavm-switchd.socket").stdout.strip() == "active"


def _client(script: str, *args: str, key: str = "") -> dict:
    ns = config.load_config().lan.ns_client
    run = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, str(HERE / "clients" / script), *args],
        capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "LLAMAVM_KEY": key},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_openai_client_gets_answers_from_two_models_in_a_row(keyed, host) -> None:
    cat, key = keyed
    answers = _answers()
    result = _client("routing.py", f"{_base(host, cat)}/v1", "two", "qwen", "gpt-oss", key=key)
    assert {"qwen3-coder-30b", "gpt-oss-120b", "gpt-oss-120b:high"} <= set(result["ids"])
    qwen, oss = result["answers"]
    assert qwen["content"] == answers["qwen3-coder-30b"]["answer"]
    assert oss["content"] == answers["gpt-oss-120b"]["answer"]
    assert oss["reasoning"] == answers["gpt-oss-120b"]["reasoning"]
    assert _serving(host, cat, key) == "gpt-oss-120b"


def test_a_burst_naming_two_models_all_succeeds_with_one_model_alive(keyed, host) -> None:
    cat, key = keyed
    with sampled(_servers) as samples:
        result = _client(
            "routing.py", f"{_base(host, cat)}/v1", "burst", "qwen", "gpt-oss", key=key
        )
    failed = [r for r in result["results"] if not r["ok"]]
    assert not failed, failed
    assert len(result["results"]) == 20
    assert samples and max(samples) <= 1, samples


def test_the_picker_page_switches_by_click_in_a_real_browser(keyed, host) -> None:
    for tool in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not Path(tool).exists():
            pytest.skip(f"{tool} is missing (scripts/bootstrap test installs it)")
    cat, key = keyed
    target = "qwen3-coder-30b" if _serving(host, cat, key) != "qwen3-coder-30b" else "gpt-oss-120b"
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / "picker-page-switch.png"
    shot.unlink(missing_ok=True)
    machine.client_run(["ip", "link", "set", "lo", "up"])  # chromedriver listens on localhost
    ns = config.load_config().lan.ns_client
    run = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, str(HERE / "browser" / "picker.py"),
         f"{_base(host, cat)}/", str(shot), target],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "LLAMAVM_UI_KEY": key},
    )  # fmt: skip
    assert run.returncode == 0, f"{run.stderr[-3000:]}\n(screenshot: {shot})"
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert any("serving on port" in line or target in line for line in answer["progress"])
    assert target in answer["serving"]
    assert _serving(host, cat, key) == target
    assert shot.stat().st_size > 20_000, f"{shot} looks blank"


def test_restart_through_the_api_restarts_the_serving_model(keyed, host) -> None:
    cat, key = keyed
    serving = _serving(host, cat, key)
    assert serving is not None
    unit = cat.resolve(serving).unit
    pid = host_run(f"systemctl show -p MainPID --value {unit}").stdout.strip()
    code, body = _post(f"{_base(host, cat)}/restart", key)
    assert code == 200, body
    assert json.loads(body)["restarted"] == serving
    assert host_run(f"systemctl show -p MainPID --value {unit}").stdout.strip() != pid
    assert _serving(host, cat, key) == serving


def _invoke_via(via: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / "invoke"), *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, control_api.VIA_ENV: via},
    )  # fmt: skip


def test_invoke_switch_through_the_api_keeps_the_key_0600_and_follows_a_rotation(
    keyed, host
) -> None:
    """Last in the module: it rotates the key the fixture read."""
    cat, key = keyed
    inv = inventory.resolve(None)
    (target,) = fleet.pick(inv.path, None)
    control_api.forget_key(target)
    cached = control_api._key_path(target)
    names = ("qwen3-coder-30b", "gpt-oss-120b")

    def switch_to_the_other() -> subprocess.CompletedProcess[str]:
        other = names[1] if _serving(host, cat, key) == names[0] else names[0]
        done = _invoke_via("api", "switch", "--model", other, "--catalog", str(cat.path))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{other} serving at" in done.stdout
        assert "over SSH instead" not in done.stderr
        return done

    switch_to_the_other()
    assert cached.read_text().strip() == key
    assert oct(cached.stat().st_mode & 0o777) == "0o600"
    assert oct(cached.parent.stat().st_mode & 0o777) == "0o700"
    cached.write_text("a-stale-key-from-before-a-rotation\n")
    switch_to_the_other()  # 401, fetched again, switched
    assert cached.read_text().strip() == key
    rotated = invoke("key.rotate", "--catalog", str(cat.path))
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert not cached.exists()
    key = host_run("cat /etc/llamavm/api-key").stdout.strip()
    # The rotation restarts the control service with the new key: wait for it.
    wait_for(lambda: http_code(f"{_base(host, cat)}/health") == 200, 60, "the control service")
    switch_to_the_other()
    assert cached.read_text().strip() == key
    # With the control service down, auto goes over SSH, and api alone says it can't.
    host_run("systemctl stop llamavm-control.service")
    try:
        other = names[1] if _serving_ssh() == names[0] else names[0]
        refused = _invoke_via("api", "switch", "--model", other, "--catalog", str(cat.path))
        assert refused.returncode == 5, refused.stdout + refused.stderr
        done = _invoke_via("auto", "switch", "--model", other, "--catalog", str(cat.path))
        assert done.returncode == 0, done.stdout + done.stderr
        assert _serving_ssh() == other
    finally:
        host_run("systemctl start llamavm-control.service")


def _serving_ssh() -> str | None:
    answer = invoke("status", "--json")
    assert answer.returncode == 0, answer.stderr
    return next(iter(json.loads(answer.stdout).values())).get("active")
