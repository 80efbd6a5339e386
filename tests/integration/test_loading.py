"""How a model's bytes reach its server, on the test bed: staged copies (the default,
qwen3-coder-30b) and models read from the share without mmap (gpt-oss-120b); a file replaced on
the share while it is served.

The test bed's share is a read-only bind mount of a controller folder, so "the server replaced
the file" is a rename in that folder. Kernel NFS (a server that goes away) runs in the VM suite.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from llamavm.artifacts import tinymodel
from llamavm.inputs import catalog
from tests.integration.helpers import (
    SHARE,
    host_run,
    http_code,
    invoke,
    main_pid,
    url,
)

pytestmark = pytest.mark.testbed

STAGE_DIR = "/var/cache/llamavm/models"


@pytest.fixture(scope="module")
def loading_catalog(provisioned, models) -> catalog.Catalog:
    """The test bed's catalog: qwen3-coder-30b is staged (the default mode), gpt-oss-120b read
    from the share."""
    assert [models.load_mode(m) for m in models.models] == ["stage", "share"]
    return models


def _switch(cat: catalog.Catalog, name: str) -> str:
    result = invoke("switch", "--model", name, "--catalog", str(cat.path))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def _status(cat: catalog.Catalog) -> dict:
    result = invoke("status", "--json", "--catalog", str(cat.path))
    assert result.returncode == 0, result.stdout + result.stderr
    answer = next(iter(json.loads(result.stdout).values()))
    return {m["name"]: m for m in answer["models"]}


def _cmdline(unit: str) -> list[str]:
    pid = main_pid(unit)
    return host_run(f"tr '\\0' '\\n' < /proc/{pid}/cmdline").stdout.splitlines()


def _completes(host: str, model: catalog.Model) -> bool:
    code = http_code(
        url(host, model, "/completion"),
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"prompt": "hi", "n_predict": 2}',
    )
    return code == 200


def test_a_staged_model_serves_a_verified_local_copy(loading_catalog, models, host) -> None:
    two, one = models.default, next(m for m in models.models if m != models.default)
    _switch(loading_catalog, one.name)
    host_run(f"rm -f {STAGE_DIR}/{two.name}.gguf {STAGE_DIR}/{two.name}.gguf.json")
    first = _switch(loading_catalog, two.name)
    assert "staged " in first and "while the old model served" in first, first
    assert "downtime" in first
    argv = _cmdline(two.unit)
    assert argv[argv.index("--model") + 1] == f"{STAGE_DIR}/{two.name}.gguf"
    staged = host_run(f"stat -c '%a %U' {STAGE_DIR}/{two.name}.gguf").stdout.split()
    assert staged == ["644", "root"]
    assert host_run(f"cmp {STAGE_DIR}/{two.name}.gguf /srv/models/{two.gguf}").returncode == 0
    report = _status(loading_catalog)[two.name]
    assert report["load"] == "stage" and report["file"] == "staged"
    assert report["last_cold"]["read_bytes"] == (SHARE / two.gguf).stat().st_size
    _switch(loading_catalog, one.name)
    again = _switch(loading_catalog, two.name)
    assert "bytes already local (staged)" in again, again
    assert _status(loading_catalog)[two.name]["last_warm"]["read_bytes"] == 0
    assert _completes(host, two)


def test_a_share_model_is_read_without_mmap(loading_catalog, host) -> None:
    shared = next(m for m in loading_catalog.models if loading_catalog.load_mode(m) == "share")
    _switch(loading_catalog, shared.name)
    argv = _cmdline(shared.unit)
    assert argv[argv.index("--model") + 1] == f"/srv/models/{shared.gguf}"
    assert argv[argv.index("--load-mode") + 1] == "none"
    pid = main_pid(shared.unit)
    name = shared.gguf.rsplit("/", 1)[-1]
    assert host_run(f"grep -c {name} /proc/{pid}/maps").stdout.strip() == "0"
    assert _status(loading_catalog)[shared.name]["file"] == "share"


@pytest.mark.parametrize("name", ["shared", "staged"])
def test_a_file_replaced_on_the_share_while_served_does_not_crash_it(
    loading_catalog, models, host, name
) -> None:
    """Replaced the way a download tool does it: a new file renamed over the old one."""
    mode = "share" if name == "shared" else "stage"
    model = next(m for m in loading_catalog.models if loading_catalog.load_mode(m) == mode)
    _switch(loading_catalog, model.name)
    pid = main_pid(model.unit)
    original = SHARE / model.gguf
    keep = original.with_name(original.name + ".orig")
    shutil.copy2(original, keep)
    try:
        fresh = original.with_name(original.name + ".new")
        if name == "shared":  # other weights: a different file altogether
            tinymodel.write(tinymodel.TinySpec(model.name, seed=99), fresh)
        else:  # the catalog pins nothing here, but keep the bytes: only the inode changes
            shutil.copy(original, fresh)
        os.replace(fresh, original)
        for _ in range(3):
            assert _completes(host, model)
        assert main_pid(model.unit) == pid, "the server restarted"
        if name == "staged":  # the next switch sees a new file version and stages it anew
            other = next(m for m in loading_catalog.models if m != model)
            _switch(loading_catalog, other.name)
            again = _switch(loading_catalog, model.name)
            assert "staged " in again, again
    finally:
        os.replace(keep, original)
