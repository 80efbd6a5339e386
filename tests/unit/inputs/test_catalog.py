"""Catalog validation: one malformed catalog per rule, each must give one clear line and exit 2."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamavm.inputs import catalog
from tests.unit.fakes.catalog import VALID


def _write(tmp_path: Path, data: Any, raw: str | None = None) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(data, sort_keys=False))
    return path


def _mutated(mutate) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    mutate(data)
    return data


def test_valid_catalog_loads(tmp_path: Path) -> None:
    cat = catalog.load(_write(tmp_path, VALID))
    assert [m.name for m in cat.models] == ["alpha", "beta"]
    assert cat.resolve("b").name == "beta"
    assert cat.default.name == "alpha"
    assert cat.models[0].ctx_size == 4096  # defaults fill in
    assert cat.models[0].unit == "llamavm-model-alpha.service"


def test_shipped_catalogs_are_valid() -> None:
    for name in ("models.yaml", "models.testbed.yaml"):
        cat = catalog.load(catalog.REPO_ROOT / "config" / name)
        assert len(cat.models) >= 2
        assert len({m.port for m in cat.models}) == len(cat.models)
    prod = catalog.load(catalog.REPO_ROOT / "config" / "models.yaml")
    names = {m.name for m in prod.models}
    assert {"gpt-oss-120b", "qwen3-coder-30b"} <= names
    assert prod.resolve("qwen").port == 8001
    assert prod.resolve("gpt-oss").port == 8002


def _set(path: str, value: Any):
    """A mutation that sets a dotted path (numbers index lists) to value, or deletes it."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        key: Any = int(last) if last.isdigit() else last
        if value is _DELETE:
            del node[key]
        else:
            node[key] = value

    return mutate


_DELETE = object()

# (rule, mutation, fragments that must all appear in the one-line message)
CASES = [
    ("unknown top-level key", _set("extra", 1), ["extra: unknown key"]),
    ("unknown settings key", _set("settings.share", "/x"), ["settings.share", "unknown key"]),
    ("unknown model key", _set("models.0.portt", 9000), ["models[0] (alpha).portt", "unknown key"]),
    (
        "port wrong type",
        _set("models.0.port", "8001"),
        ["models[0] (alpha).port", "must be an integer"],
    ),
    ("boolean for int", _set("models.1.n_cpu_moe", True), ["(beta).n_cpu_moe", "boolean"]),
    ("aliases wrong type", _set("models.0.aliases", "a"), ["(alpha).aliases", "must be a list"]),
    (
        "models not a list",
        _set("models", {"a": 1}),
        ["models: {'a': 1} is a mapping", "must be a list"],
    ),
    ("missing name", _set("models.0.name", _DELETE), ["models[0].name", "is missing"]),
    ("missing gguf", _set("models.1.gguf", _DELETE), ["(beta).gguf", "is missing"]),
    ("missing port", _set("models.1.port", _DELETE), ["(beta).port", "is missing"]),
    ("missing settings", _set("settings", _DELETE), ["settings: is missing"]),
    (
        "missing budget",
        _set("settings.vram.budget_mib", _DELETE),
        ["settings.vram.budget_mib", "missing"],
    ),
    (
        "duplicate name",
        _set("models.1.name", "alpha"),
        ["(alpha).name", "already used by model alpha"],
    ),
    ("duplicate alias", _set("models.1.aliases", ["a"]), ["(beta).aliases", "'a' is already used"]),
    ("alias equals name", _set("models.1.aliases", ["alpha"]), ["(beta).aliases", "already used"]),
    (
        "duplicate port",
        _set("models.1.port", 8001),
        ["(beta).port", "8001 is already used by model alpha"],
    ),
    ("port below 1024", _set("models.0.port", 80), ["(alpha).port: 80 is below 1024"]),
    ("port above 65535", _set("models.0.port", 70000), ["(alpha).port: 70000 is above 65535"]),
    ("port reserved", _set("models.0.port", 9100), ["(alpha).port", "reserved for node_exporter"]),
    ("port reserved proxy", _set("models.0.port", 8443), ["(alpha).port", "reserved for proxy"]),
    (
        "path with ..",
        _set("models.0.gguf", "../etc/x.gguf"),
        ["(alpha).gguf", "escapes the model share"],
    ),
    ("path nested ..", _set("models.0.gguf", "a/../../x.gguf"), ["(alpha).gguf", "escapes"]),
    (
        "absolute path",
        _set("models.0.gguf", "/etc/x.gguf"),
        ["(alpha).gguf", "not relative to the model share"],
    ),
    ("home path", _set("models.0.gguf", "~/x.gguf"), ["(alpha).gguf", "not relative"]),
    ("not gguf", _set("models.0.gguf", "alpha/alpha.bin"), ["(alpha).gguf", "not a .gguf file"]),
    (
        "default unknown",
        _set("settings.default_model", "gamma"),
        ["settings.default_model", "'gamma' is not in the catalog"],
    ),
    (
        "bad name",
        _set("models.0.name", "Alpha One"),
        ["models[0] (Alpha One).name", "not a valid name"],
    ),
    ("bad sha", _set("models.0.sha256", "abc"), ["(alpha).sha256", "not a SHA-256"]),
    ("zero size", _set("models.0.size_bytes", 0), ["(alpha).size_bytes: 0 is below 1"]),
    (
        "bad cache type",
        _set("models.0.cache_type", "q3"),
        ["(alpha).cache_type", "not a KV cache type"],
    ),
    (
        "bad load mode",
        _set("models.0.load", "mmap"),
        ["(alpha).load", "'mmap' is not a loading mode", "use stage"],
    ),
    (
        "bad default load mode",
        _set("settings.loading", {"default": "nfs"}),
        ["settings.loading.default", "not a loading mode"],
    ),
    (
        "stage cap zero",
        _set("settings.loading", {"stage_cap_gib": 0}),
        ["settings.loading.stage_cap_gib: 0 is below 1"],
    ),
    (
        "ctx not multiple",
        _set("models.0.parallel", 3),
        ["(alpha).ctx_size", "multiple of parallel"],
    ),
    ("negative moe", _set("models.1.n_cpu_moe", -1), ["(beta).n_cpu_moe", "below 0"]),
    (
        "secret flag",
        _set("models.0.extra_args", ["--api-key", "x"]),
        ["(alpha).extra_args[0]", "secret"],
    ),
    ("managed flag", _set("models.0.extra_args", ["--port=9"]), ["(alpha).extra_args[0]", "port"]),
    (
        "bad api policy",
        _set("settings.api_key.policy", "maybe"),
        ["settings.api_key.policy: 'maybe' is not a policy", "required", "none"],
    ),
    (
        "relative share",
        _set("settings.share_path", "models"),
        ["settings.share_path: 'models' is not an absolute path"],
    ),
    (
        "reserve over budget",
        _set("settings.vram.reserve_mib", 40000),
        ["settings.vram.reserve_mib", "smaller"],
    ),
    (
        "reserved port not int",
        _set("settings.reserved_ports.ssh", "22"),
        ["reserved_ports.ssh: '22' is a string", "must be an integer"],
    ),
    ("empty models", _set("models", []), ["models", "empty"]),
    (
        "allow_from not a network",
        _set("settings.expose", {"allow_from": ["10.0.0.0/8", "lan"]}),
        ["settings.expose.allow_from[1]: 'lan' is not a network", "CIDR"],
    ),
    (
        "firewall not a bool",
        _set("settings.expose", {"firewall": "yes"}),
        ["settings.expose.firewall: 'yes' is a string", "boolean"],
    ),
    (
        "metrics without a port",
        _set("settings.reserved_ports", {"ssh": 22}),
        ["settings.reserved_ports: has no node_exporter port", "metrics: false"],
    ),
]


@pytest.mark.parametrize(("rule", "mutate", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_each_rule_gives_one_clear_line(tmp_path: Path, rule: str, mutate, fragments) -> None:
    path = _write(tmp_path, _mutated(mutate))
    with pytest.raises(catalog.CatalogError) as caught:
        catalog.load(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert " — " in message, "every message says what to do"
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("settings: [\n  models: 1\n", "invalid YAML at line"),
        ("settings:\n\tshare_path: /x\n", "invalid YAML"),
        ("", "the file is empty"),
        ("- just\n- a list\n", "not a mapping"),
    ],
)
def test_bad_yaml(tmp_path: Path, raw: str, fragment: str) -> None:
    with pytest.raises(catalog.CatalogError, match=fragment):
        catalog.load(_write(tmp_path, None, raw))


def test_missing_file_names_the_override(tmp_path: Path) -> None:
    with pytest.raises(catalog.CatalogError, match="--catalog PATH or set \\$LLAMAVM_CATALOG"):
        catalog.load(tmp_path / "nope.yaml")


def test_resolve_unknown_lists_known(tmp_path: Path) -> None:
    cat = catalog.load(_write(tmp_path, VALID))
    with pytest.raises(catalog.CatalogError, match="known models: alpha, beta"):
        cat.resolve("gamma")


@pytest.mark.parametrize(
    ("rule", "mutate", "fragments"),
    [CASES[3], CASES[12], CASES[16], CASES[20], CASES[25]],
    ids=["type", "dup-name", "low-port", "dotdot", "default"],
)
def test_cli_exit_code_2_and_no_traceback(tmp_path, invoke_cli, rule, mutate, fragments) -> None:
    path = _write(tmp_path, _mutated(mutate))
    for args in (["models", "--catalog", str(path)], ["models", "--json"]):
        env = {"LLAMAVM_CATALOG": str(path)} if "--catalog" not in args else {}
        result = invoke_cli(*args, env=env)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("llamavm: ")
        for fragment in fragments:
            assert fragment in lines[0]


def test_catalog_flag_beats_environment(tmp_path, invoke_cli) -> None:
    good = _write(tmp_path, VALID)
    bad = tmp_path / "bad.yaml"
    bad.write_text("settings: [")
    result = invoke_cli("models", "--catalog", str(good), env={"LLAMAVM_CATALOG": str(bad)})
    assert result.returncode == 0, result.stderr
    assert "alpha" in result.stdout
    result = invoke_cli("models", env={"LLAMAVM_CATALOG": str(bad)})
    assert result.returncode == 2
    assert str(bad) in result.stderr


def test_a_catalog_text_that_passed_the_schema_is_not_checked_again(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path, VALID)
    checked: list[str] = []
    real = catalog._validate
    monkeypatch.setattr(catalog, "_validate", lambda c, d: checked.append("x") or real(c, d))
    catalog.load(path)
    catalog.load(path)
    assert checked == ["x"]  # the second read of the same text skipped the schema
    changed = _mutated(lambda d: d["models"][0].update(port=8005))
    catalog.load(_write(tmp_path, changed))
    assert checked == ["x", "x"]
    bad = _mutated(lambda d: d["models"][0].update(port="eight"))
    for _ in range(2):  # a text that failed is never remembered
        with pytest.raises(catalog.CatalogError):
            catalog.load(_write(tmp_path, bad))
    assert checked == ["x", "x", "x", "x"]
    assert len(list((tmp_path / "cache" / "catalogs").iterdir())) == 2
