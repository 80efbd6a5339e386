"""Hostile and malformed catalogs: each is refused fast, in one line, with exit code 2.

Control characters in any string could inject systemd directives into the model units (up to a
command run as root); alias bombs, endless numbers and deep nesting used to exhaust or crash
the validator. Every case here goes through `catalog.load`, a few through the real CLI.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamavm.inputs import catalog
from tests.unit.fakes.catalog import VALID

STRING_FIELDS = [
    ("settings", "share_path"),
    ("settings", "controller_share_path"),
    ("settings", "bind_address"),
    ("settings", "default_model"),
    ("settings", "api_key", "file"),
    ("models", 0, "name"),
    ("models", 0, "aliases", 0),
    ("models", 0, "gguf"),
    ("models", 0, "description"),
    ("models", 0, "extra_args", 1),
    ("models", 0, "sha256"),
]
CONTROL = ["\n", "\r", "\t", "\x1b", "\x00", "\x7f", "\x85", "\u2028", "\u202e", "\u200b"]


def _data() -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    data["settings"]["controller_share_path"] = "/srv/share"
    data["models"][0]["description"] = "a model"
    data["models"][0]["extra_args"] = ["--temp", "0.7"]
    data["models"][0]["sha256"] = "ab" * 32
    return data


def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _load_text(tmp_path: Path, text: str) -> tuple[str, float]:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    began = time.monotonic()
    with pytest.raises(catalog.CatalogError) as caught:
        catalog.load(path)
    elapsed = time.monotonic() - began
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert " — " in message, "every message says what to do"
    return message, elapsed


def _load(tmp_path: Path, data: Any) -> str:
    # JSON is YAML: its \uXXXX escapes bring every character through exactly as written.
    return _load_text(tmp_path, json.dumps(data))[0]


def test_the_hostile_fixture_itself_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(_data(), sort_keys=False))
    assert catalog.load(path).models[0].extra_args == ("--temp", "0.7")


@pytest.mark.parametrize("field", STRING_FIELDS, ids=lambda f: ".".join(map(str, f)))
@pytest.mark.parametrize("char", CONTROL, ids=lambda c: f"U+{ord(c):04X}")
def test_control_characters_are_refused_in_every_string(tmp_path, field, char) -> None:
    data = _data()
    node: Any = data
    for part in field:
        node = node[part]
    # Keep the rest of the value valid, so only the control character can be the reason.
    _set(data, field, node + char if field[-1] != "gguf" else node.replace(".gguf", f"{char}.gguf"))
    message = _load(tmp_path, data)
    assert f"contains the control character U+{ord(char):04X}" in message


def test_control_character_in_a_key_is_refused(tmp_path) -> None:
    data = _data()
    data["settings"]["reserved_ports"]["ssh\nExecStartPre=/bin/sh"] = 2222
    assert "control character U+000A" in _load(tmp_path, data)


def test_unit_injection_through_extra_args_is_refused(tmp_path) -> None:
    data = _data()
    data["models"][0]["extra_args"] = ["--temp", "0.7\nExecStartPre=/bin/touch /root/pwned"]
    message = _load(tmp_path, data)
    assert "models[0] (alpha).extra_args[1]" in message and "control character" in message


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("settings", "bind_address"), "localhost", "is not an IP address"),
        (("settings", "bind_address"), "999.1.1.1", "is not an IP address"),
        (("settings", "bind_address"), "0.0.0.0 --x", "is not an IP address"),
        (("settings", "share_path"), "/", "is not an absolute path"),
        (("settings", "share_path"), "/mnt/my models", "is not an absolute path"),
        (("settings", "share_path"), "/mnt/%h", "is not an absolute path"),
        (("settings", "share_path"), "/mnt/models/", "is not an absolute path"),
        (("settings", "share_path"), "/home", "would hide the system folder /home"),
        (("settings", "share_path"), "/etc", "would hide the system folder /etc"),
        (("settings", "share_path"), "/var", "would hide the system folder /var"),
        (("settings", "share_path"), "/tmp", "would hide the system folder /tmp"),
        (("settings", "share_path"), "/etc/models", "is inside the system folder /etc"),
        (("settings", "share_path"), "/usr/share/models", "is inside the system folder /usr"),
        (("settings", "share_path"), "/var/lib/models", "is inside the system folder /var/lib"),
        (("settings", "share_path"), "/mnt/../etc", "has a '.' or '..' part"),
        (("settings", "share_path"), "/mnt/./models", "has a '.' or '..' part"),
        (("settings", "share_path"), "/srv/models", None),
        (("settings", "share_path"), "/home/me/models", None),
        (("settings", "api_key", "file"), "/etc/shadow", "is not a file in /etc/llamavm"),
        (("settings", "api_key", "file"), "/etc/llamavm/../shadow", "is not a file in"),
        (("settings", "controller_share_path"), "relative/dir", "is not an absolute path"),
        (("models", 1, "name"), "beta.v2", None),
        (("models", 0, "name"), "-alpha", "is not a valid name"),
        (("models", 0, "name"), "a" * 64, "is not a valid name"),
        (("models", 0, "aliases"), ["ok", "Not Ok"], "is not a valid name"),
        (("settings", "default_model"), "x y", "is not a valid name"),
        (("models", 0, "gguf"), "a/../../etc/x.gguf", "escapes the model share"),
        (("models", 0, "description"), "x" * 201, "is longer than 200 characters"),
    ],
)
def test_every_field_is_checked_for_what_it_is(tmp_path, path, value, fragment) -> None:
    data = _data()
    _set(data, path, value)
    if fragment is None:  # a name with a dot is fine, a share on a folder of its own too
        file = tmp_path / "ok.yaml"
        file.write_text(yaml.safe_dump(data))
        loaded = catalog.load(file)
        if path[-1] == "share_path":
            assert loaded.settings.share_path == value
        else:
            assert loaded.models[1].name == value
        return
    assert fragment in _load(tmp_path, data)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tools", "all"], "--tools is refused: server-side tools"),
        (["--agent"], "--agent is refused"),
        (["--mcp-servers-json", "{}"], "MCP servers"),
        (["--slot-save-path", "/tmp"], "llamavm sets it itself"),
        (["--props"], "change the server's settings"),
        (["--path", "/"], "serves files"),
        (["--log-file", "/tmp/x"], "writes files"),
        (["--embedding"], "is set by llamavm"),
        (["--api-prefix", "/x"], "moves /health"),
        (["--reuse-port"], "second server"),
        (["-ot", "exps=CPU"], "tensor placement"),
        (["--hf-repo", "a/b"], "downloads a model"),
        (["--no-such-flag"], "not on llamavm's allow-list"),
        (["--ctx-size", "8"], "is set by llamavm — use the catalog key ctx_size"),
        (["--port=9"], "use the catalog key port"),
        (["--temp", "hot"], "--temp: 'hot' is not a number"),
        (["--temp", "nan"], "is not a number"),
        (["--temp", "1e999"], "1e999 is outside 0 to 100"),
        (["--threads", "99999"], "99999 is outside -1 to 1024"),
        (["--flash-attn", "maybe"], "'maybe' is not one of on, off, auto"),
        (["on"], "'on' is not a flag"),
        (["--jinja=1"], "--jinja takes no value"),
        (["--temp"], "--temp needs a value"),
        (["--temp", "0.5", "--temp=0.6"], "given twice"),
        (["--chat-template", "x" * 65], "longer than 64"),
    ],
)
def test_extra_args_allow_list(tmp_path, args, fragment) -> None:
    data = _data()
    data["models"][0]["extra_args"] = args
    message = _load(tmp_path, data)
    assert "models[0] (alpha).extra_args[" in message
    assert fragment in message


def test_allowed_extra_args_pass(tmp_path) -> None:
    data = _data()
    data["models"][0]["extra_args"] = [
        "--jinja", "--flash-attn", "on", "--temp=0.6", "--seed", "-1", "-ub", "1024",
        "--reasoning-budget", "0", "--threads", "8",
    ]  # fmt: skip
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(data))
    assert len(catalog.load(path).models[0].extra_args) == 12


BILLION_LAUGHS = """
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
settings: *i
models: *i
"""


def _with_value(key: str, literal: str) -> str:
    base = yaml.safe_dump(_data(), sort_keys=False)
    return base.replace("  port: 8001\n", f"  port: 8001\n  {key}: {literal}\n", 1)


HOSTILE = {
    "alias bomb": (BILLION_LAUGHS, "expands to more than"),
    "digits": (_with_value("ctx_size", "9" * 5000), "more than 32 characters"),
    "hex digits": (_with_value("ctx_size", "0x" + "f" * 400), "more than 32 characters"),
    "2^40 context": (_with_value("ctx_size", str(2**40)), "is above 16777216"),
    "10^30 timeout": (_with_value("health_timeout_s", "1" + "0" * 30), "is above 86400"),
    "float overflow": (_with_value("ctx_size", "1.0e+400"), "is an infinite number"),
    "nan": (_with_value("parallel", ".nan"), "is not a number"),
    "float port": (_with_value("n_cpu_moe", "4.0"), "is a decimal number"),
    "negative": (_with_value("vram_mib", "-5"), "is below 1"),
    "deep nesting": ("settings: " + "[" * 5000 + "]" * 5000 + "\n", "nesting deeper than"),
    "deep mappings": ("x:\n" + "".join(" " * i + "a:\n" for i in range(1, 200)), "nesting"),
    "huge file": ("# " + "x" * (300 * 1024) + "\n", "larger than 256 KiB"),
    "duplicate key": (_with_value("port", "8003"), "duplicate key 'port'"),
    "python tag": ("settings: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
    "unhashable key": ("? [a, b]\n: 1\n", "invalid YAML"),
    "date": (_with_value("vram_mib", "2024-01-01"), "is a date value"),
    "binary": (_with_value("vram_mib", "!!binary aGk="), "is a bytes value"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_yaml_is_refused_in_under_a_second(tmp_path, case) -> None:
    text, fragment = HOSTILE[case]
    message, elapsed = _load_text(tmp_path, text)
    assert fragment in message
    assert elapsed < 1.0, f"took {elapsed:.2f}s"


@pytest.mark.parametrize("case", ["alias bomb", "digits", "deep nesting", "float overflow"])
def test_hostile_yaml_through_the_cli(tmp_path, invoke_cli, case) -> None:
    text, fragment = HOSTILE[case]
    path = tmp_path / "models.yaml"
    path.write_text(text)
    result = invoke_cli("models", "--catalog", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llamavm: ") and fragment in lines[0]


@pytest.mark.parametrize(
    ("reasoning", "fragment"),
    [
        ({"effort": "extreme"}, "reasoning.effort: 'extreme' is not a reasoning effort"),
        ({"effort": "high", "presets": ["low"]}, "'high' is not one of its presets"),
        ({"presets": []}, "reasoning.presets"),
        ({"format": "harmony"}, "is not a reasoning format"),
        ({"budget": 3}, "reasoning"),
        ("high", "reasoning"),
    ],
)
def test_bad_reasoning_presets_are_refused_in_one_line(tmp_path, reasoning, fragment) -> None:
    data = _data()
    data["models"][0]["reasoning"] = reasoning
    assert fragment in _load(tmp_path, data)


def test_reasoning_flags_in_extra_args_point_at_the_catalog_key(tmp_path) -> None:
    data = _data()
    data["models"][0]["extra_args"] = ["--reasoning-effort", "low"]
    assert "use the catalog key reasoning.effort" in _load(tmp_path, data)


@pytest.mark.parametrize("port", [8001, 8443])
def test_the_control_port_may_not_be_a_models_or_a_reserved_port(tmp_path, port) -> None:
    data = _data()
    data["settings"]["control"] = {"port": port}
    message = _load(tmp_path, data)
    assert f"settings.control.port: {port} is already used by" in message
