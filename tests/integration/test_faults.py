"""Faults and hostile conditions on the test bed: the switch completes or rolls back on its
own whatever happens to the session that asked for it, and the CLI tells the truth.

Failpoints (llamavm/host/store.py: a root-only file on the host) hold a transaction at a named
phase, so the SSH session can be cut exactly there; everything else is real: systemd, SSH,
llama-server, the LAN client.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from llamavm.artifacts import tinymodel
from llamavm.inputs import catalog
from llamavm.ops import control_api
from llamavm.testbed import machine
from tests.integration.helpers import (
    INVOKE,
    REPO_ROOT,
    SHARE,
    active_units,
    catalog_with,
    clear_failpoints,
    host_run,
    http_code,
    invoke,
    main_pid,
    running_servers,
    set_failpoints,
    status,
    url,
    wait_for,
)

pytestmark = pytest.mark.testbed


@pytest.fixture
def one_serving(provisioned, models) -> Iterator[tuple[catalog.Model, catalog.Model]]:
    """Start with the default model serving and no failpoints; clean up after."""
    clear_failpoints()
    result = invoke("switch", "--model", models.default.name)
    assert result.returncode == 0, result.stderr
    other = next(m for m in models.models if m != models.default)
    yield models.default, other
    clear_failpoints()


def _exactly_one_serves(expected: catalog.Model, host: str) -> None:
    assert active_units() == [expected.unit]
    assert len(running_servers()) == 1
    assert http_code(url(host, expected, "/health")) == 200
    answer = status()
    assert answer["active"] == expected.name and answer["running"] == [expected.name]
    assert answer["transaction"] is None


def _lock_is_free() -> None:
    result = host_run("flock -n /run/llamavm/lock/switch.lock true")
    assert result.returncode == 0, "the switch lock is still held"


def _switch_and_cut(
    model: str, when: str, via: str = "ssh", cut_helper: bool = False
) -> subprocess.CompletedProcess[str]:
    """`invoke switch --model MODEL` over `via` (ssh, or api: the control service), its
    connection cut once `when` is printed: its SSH client killed, or the control service (or,
    with cut_helper, the control service's root helper, as a provision's handler stops it)."""
    proc = subprocess.Popen(
        [str(INVOKE), "switch", "--model", model],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, control_api.VIA_ENV: via},
    )
    assert proc.stderr is not None
    seen: list[str] = []
    cut = threading.Event()

    def watch() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if not cut.is_set() and when in line:
                if via == "ssh":
                    # The controller's ssh to the host dies, as on a dropped Wi-Fi or a closed lid.
                    subprocess.run(["pkill", "-KILL", "-f", f"llamavm-switch switch {model} --tx"])
                elif cut_helper:
                    host_run("systemctl stop llamavm-switchd.service")
                else:
                    # The control service dies under the open stream (systemd restarts it).
                    host_run("systemctl kill --signal=KILL llamavm-control.service")
                cut.set()

    reader = threading.Thread(target=watch)
    reader.start()
    assert proc.stdout is not None
    stdout = proc.stdout.read()  # stderr is the reader's alone
    proc.wait(timeout=300)
    reader.join()
    assert cut.is_set(), f"never saw {when!r}: {''.join(seen)}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(seen))


PHASES = {
    # failpoint -> the progress line printed just before it holds
    "after_stop": "stopping",
    "in_load": "starting",
    "in_verify": "verifying",
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_ssh_cut_mid_switch_the_switch_completes_and_the_cli_says_so(
    one_serving, host, phase
) -> None:
    old, new = one_serving
    set_failpoints({phase: {"sleep": 4}})
    result = _switch_and_cut(new.name, PHASES[phase])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the session ended before switch reported" in result.stderr
    assert f"{new.name} serving at" in result.stdout
    assert "the host finished the transaction on its own" in result.stdout
    clear_failpoints()
    _exactly_one_serves(new, host)
    assert http_code(url(host, old, "/health")) is None
    _lock_is_free()


@pytest.mark.parametrize("phase", list(PHASES))
def test_ssh_cut_then_a_failure_rolls_back_and_the_cli_says_so(one_serving, host, phase) -> None:
    old, new = one_serving
    set_failpoints({phase: {"sleep": 4, "raise": "injected after the cut"}})
    result = _switch_and_cut(new.name, PHASES[phase])
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"rolled back, {old.name} is serving again" in result.stdout
    clear_failpoints()
    _exactly_one_serves(old, host)
    _lock_is_free()


@pytest.mark.parametrize("fails", [False, True], ids=["completes", "rolls-back"])
@pytest.mark.parametrize("cut", ["control-service", "helper"])
def test_control_service_killed_mid_api_switch_the_cli_learns_the_outcome_over_ssh(
    one_serving, host, fails, cut
) -> None:
    """`invoke switch` through the control API; the service dies while the new model loads (or
    its root helper stops, as a provision restarts it): the transaction goes on in its own unit,
    and the CLI asks over SSH how it ended."""
    old, new = one_serving
    failure = {"raise": "injected after the cut"} if fails else {}
    set_failpoints({"in_load": {"sleep": 4, **failure}})
    helper = cut == "helper"
    result = _switch_and_cut(new.name, PHASES["in_load"], via="api", cut_helper=helper)
    assert "the control API's stream ended before switch reported" in result.stderr
    assert "switching over SSH instead" not in result.stderr  # it was the API's switch
    clear_failpoints()
    if fails:
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"rolled back, {old.name} is serving again" in result.stdout
        _exactly_one_serves(old, host)
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "the host finished the transaction on its own" in result.stdout
        _exactly_one_serves(new, host)
    _lock_is_free()
    wait_for(lambda: http_code(f"http://{host}:8090/health") == 200, 30, "the control service")
    if helper:  # the socket starts a new helper for the next request
        back = invoke("switch", "--model", new.name if fails else old.name)
        assert back.returncode == 0, back.stdout + back.stderr


def test_an_exception_in_the_post_load_checks_rolls_back(one_serving, host) -> None:
    old, new = one_serving
    set_failpoints({"in_verify": {"raise": "connection reset in the checks"}})
    result = invoke("switch", "--model", new.name)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("llamavm: ") and f"{old.name} is serving again" in last
    clear_failpoints()
    _exactly_one_serves(old, host)


def test_a_killed_transaction_is_finished_by_its_recovery(one_serving, host) -> None:
    old, new = one_serving
    set_failpoints({"in_load": {"kill": True}})  # SIGKILL itself after the old model stopped
    result = invoke("switch", "--model", new.name)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "its process was killed" in result.stderr and "rolled back" in result.stderr
    clear_failpoints()
    _exactly_one_serves(old, host)
    _lock_is_free()


@pytest.fixture(scope="module")
def crash_catalog(provisioned, tmp_path_factory) -> Iterator[catalog.Catalog]:
    """The test bed catalog plus a model that crash-loops (600 s health timeout)."""
    gguf = SHARE / "faults" / "crash-loop.gguf"
    tinymodel.write(tinymodel.TinySpec("crash-loop", arch="llamavm-broken"), gguf)
    path = catalog_with(
        tmp_path_factory.mktemp("crash"),
        [{"name": "crash-loop", "gguf": "faults/crash-loop.gguf", "port": 8031,
          "health_timeout_s": 600}],
    )  # fmt: skip
    result = invoke("provision", "--catalog", str(path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    yield catalog.load(path)
    assert invoke("provision").returncode == 0
    gguf.unlink()


def test_a_crash_looping_model_is_rolled_back_in_seconds(crash_catalog, models, host) -> None:
    old = models.default
    assert (
        invoke("switch", "--model", old.name, "--catalog", str(crash_catalog.path)).returncode == 0
    )
    began = time.monotonic()
    result = invoke("switch", "--model", "crash-loop", "--catalog", str(crash_catalog.path))
    took = time.monotonic() - began
    assert result.returncode == 1, result.stdout + result.stderr
    assert "crash-loop: the server exited while loading" in result.stderr
    assert f"{old.name} is serving again" in result.stderr
    # Its health timeout is 600 s: failing fast means well under that (here: seconds).
    assert took < 60, f"took {took:.0f}s: the switch waited for the timeout"
    _exactly_one_serves(old, host)


def test_the_model_units_score_at_most_2_in_systemd_analyze_security(provisioned, models) -> None:
    result = host_run(f"systemd-analyze security --no-pager {models.default.unit}")
    print(result.stdout)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


def test_adding_a_model_and_provisioning_does_not_interrupt_the_serving_model(
    one_serving, host, tmp_path
) -> None:
    old, _ = one_serving
    pid = main_pid(old.unit)
    failures: list[int | None] = []
    done = threading.Event()

    def poll() -> None:  # a LAN client using the model all along
        while not done.is_set():
            code = http_code(url(host, old, "/health"))
            if code != 200:
                failures.append(code)
            time.sleep(0.1)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        path = catalog_with(
            tmp_path, [{"name": "tiny-extra", "gguf": "tiny/gpt-oss-120b-tiny.gguf", "port": 8021}]
        )
        result = invoke("provision", "--catalog", str(path))
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr
        conflicts = host_run(f"systemctl show -p Conflicts --value {old.unit}").stdout
        assert "llamavm-model-tiny-extra.service" in conflicts  # its unit did change ...
    finally:
        done.set()
        poller.join()
    assert main_pid(old.unit) == pid  # ... and the serving process was not restarted
    assert failures == []
    assert invoke("provision").returncode == 0  # back to the shipped catalog
    assert main_pid(old.unit) == pid


def test_a_reboot_brings_back_the_model_that_was_serving(one_serving, host) -> None:
    old, new = one_serving
    assert invoke("switch", "--model", new.name).returncode == 0
    machine.down()
    machine.up()
    wait_for(lambda: http_code(url(host, new, "/health")) == 200, 90, f"{new.name} after boot")
    _exactly_one_serves(new, host)
    assert http_code(url(host, old, "/health")) is None
    assert status()["desired"] == new.name


def test_a_reboot_mid_switch_is_recovered_at_boot(one_serving, host) -> None:
    old, new = one_serving
    set_failpoints({"after_stop": {"sleep": 60}})
    tx = f"reboot{uuid.uuid4().hex[:8]}"
    host_run(f"llamavm-switch switch {new.name} --tx {tx} >/dev/null 2>&1 &")
    wait_for(lambda: status()["transaction"] is not None, 20, "the transaction to begin")
    wait_for(lambda: active_units() == [], 20, "the old model to stop")
    machine.down()  # the power goes: /run (and the failpoint) is gone at boot
    machine.up()
    wait_for(lambda: http_code(url(host, old, "/health")) == 200, 90, f"{old.name} after boot")
    _exactly_one_serves(old, host)
    outcome = json.loads(host_run(f"llamavm-switch result {tx} --json").stdout)
    assert outcome["code"] == 1 and "rebooted" in outcome["recovered"], outcome


def test_switch_dry_checks_and_changes_nothing(one_serving) -> None:
    old, new = one_serving
    pid = main_pid(old.unit)
    result = invoke("switch", "--model", new.name, "--dry")
    assert result.returncode == 0, result.stderr
    assert f"checks pass: would stop {old.name} and serve {new.name}" in result.stdout
    assert main_pid(old.unit) == pid and active_units() == [old.unit]


def test_local_users_cannot_take_the_switch_lock(one_serving) -> None:
    result = host_run("runuser -u nobody -- flock -n /run/llamavm/lock/switch.lock sleep 30")
    assert result.returncode != 0
    assert "Permission denied" in result.stderr or "No such file" in result.stderr
    _, new = one_serving
    assert invoke("switch", "--model", new.name).returncode == 0


def test_a_malformed_state_file_is_no_traceback(one_serving, host) -> None:
    old, new = one_serving
    host_run("echo '[not, the, state' > /var/lib/llamavm/state.json")
    answer = status()
    assert answer["active"] == old.name
    result = invoke("switch", "--model", new.name)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    _exactly_one_serves(new, host)


@pytest.fixture
def keyed(provisioned, models, tmp_path) -> Iterator[catalog.Catalog]:
    path = catalog_with(
        tmp_path, [], api_key={"policy": "required", "file": "/etc/llamavm/api-key"}
    )
    result = invoke("provision", "--catalog", str(path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    yield catalog.load(path)
    assert invoke("provision").returncode == 0


def test_an_empty_api_key_is_refused_and_the_model_keeps_serving(keyed, models, host) -> None:
    old = models.default
    new = next(m for m in models.models if m != old)
    assert invoke("switch", "--model", old.name, "--catalog", str(keyed.path)).returncode == 0
    pid = main_pid(old.unit)
    host_run(": > /etc/llamavm/api-key")
    result = invoke("switch", "--model", new.name, "--catalog", str(keyed.path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "would be open" in result.stderr
    assert main_pid(old.unit) == pid
    # provision writes a new key (and keeps it root's alone, whatever mode it was given)
    host_run("chmod 0644 /etc/llamavm/api-key")
    result = invoke("provision", "--catalog", str(keyed.path))
    assert result.returncode == 0, result.stdout[-3000:]
    assert host_run("stat -c '%a %U %s' /etc/llamavm/api-key").stdout.split()[:2] == ["600", "root"]
    assert int(host_run("stat -c %s /etc/llamavm/api-key").stdout) >= 33
    key = host_run("cat /etc/llamavm/api-key").stdout.strip()
    assert invoke("switch", "--model", new.name, "--catalog", str(keyed.path)).returncode == 0
    assert http_code(url(host, new, "/v1/models")) == 401
    assert http_code(url(host, new, "/v1/models"), "-H", f"Authorization: Bearer {key}") == 200


def test_catalog_values_reach_llama_server_exactly_as_written(provisioned, host, tmp_path) -> None:
    """Quotes, %, $, backslashes and spaces in a GGUF path: systemd must pass them verbatim
    (read from the share, so the odd path itself is on the command line)."""
    odd = 'odd dir/we "ird" 100% $HOME \\x.gguf'
    target = SHARE / odd
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((SHARE / "tiny" / "qwen3-coder-30b-a3b-tiny.gguf").read_bytes())
    path = catalog_with(
        tmp_path,
        [{"name": "odd-path", "gguf": odd, "port": 8041, "load": "share",
          "extra_args": ["--chat-template-kwargs", '{"x": "a b"}']}],
    )  # fmt: skip
    try:
        assert invoke("provision", "--catalog", str(path)).returncode == 0
        result = invoke("switch", "--model", "odd-path", "--catalog", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        pid = main_pid("llamavm-model-odd-path.service")
        argv = host_run(f"cat /proc/{pid}/cmdline").stdout.split("\0")[:-1]
        contract = json.loads(host_run("cat /etc/llamavm/contract.json").stdout)
        want = next(m for m in contract["models"] if m["name"] == "odd-path")["argv"]
        # the contract's argv, then the loading flags the role picked for this build
        assert argv[: len(want)] == want
        assert argv[len(want) :] == ["--load-mode", "none"]
        assert f"/srv/models/{odd}" in argv
    finally:
        invoke("switch", "--model", "qwen3-coder-30b", "--catalog", str(path))
        assert invoke("provision").returncode == 0
        target.unlink()
        target.parent.rmdir()


@pytest.mark.parametrize("via", ["ssh", "auto"])
def test_invoke_switch_reports_a_host_that_answers_without_json(
    one_serving, monkeypatch, via
) -> None:
    """A host whose llamavm-switch prints garbage: one line, non-zero, no StopIteration — over
    SSH, and through the control API (whose helper then answers garbage too)."""
    monkeypatch.setenv(control_api.VIA_ENV, via)
    # The helper (started once, by its socket) runs what it was started from: stopped, as a
    # provision's handler stops it, its next start is the garbage.
    host_run("mv /usr/local/bin/llamavm-switch /usr/local/bin/llamavm-switch.real && "
             "printf '#!/bin/sh\\necho garbage; exit 7\\n' > /usr/local/bin/llamavm-switch && "
             "chmod 755 /usr/local/bin/llamavm-switch && "
             "systemctl stop llamavm-switchd.service")  # fmt: skip
    try:
        result = invoke("switch", "--model", one_serving[1].name)
    finally:
        # The helper ran the garbage and failed (its socket too, past its trigger limit): that
        # failure is this test's own.
        host_run("mv /usr/local/bin/llamavm-switch.real /usr/local/bin/llamavm-switch && "
                 "systemctl stop llamavm-switchd.service && "
                 "systemctl reset-failed llamavm-switchd.service llamavm-switchd.socket; "
                 "systemctl restart llamavm-switchd.socket")  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "StopIteration" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("llamavm: ")


def test_a_transaction_id_is_never_reused(one_serving) -> None:
    _, new = one_serving
    tx = f"once{uuid.uuid4().hex[:8]}"
    first = host_run(f"llamavm-switch switch {new.name} --tx {tx} --json")
    assert json.loads(first.stdout)["code"] == 0
    again = host_run(f"llamavm-switch switch {new.name} --tx {tx} --json")
    assert again.returncode == 2 and "was used before" in again.stdout
