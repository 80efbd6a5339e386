"""The allow-list of llama-server flags for a catalog model's `extra_args`.

config/llama-server-flags.yaml says which flags may be passed and what their values may be,
which flags llamavm sets itself (and the catalog key to use instead), and which are refused and
why. Anything else is refused as unknown: a block-list always has holes.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llamavm import REPO_ROOT
from llamavm.errors import LlamavmError

FLAGS_FILE = REPO_ROOT / "config" / "llama-server-flags.yaml"
_FLAG_RE = re.compile(r"-{1,2}[A-Za-z][A-Za-z0-9-]*")
_INT_RE = re.compile(r"[-+]?[0-9]{1,19}")
_FLOAT_RE = re.compile(r"[-+]?([0-9]{1,12}(\.[0-9]{0,12})?|\.[0-9]{1,12})([eE][-+]?[0-9]{1,3})?")


@dataclass(frozen=True)
class ValueSpec:
    """What a flag's value may be: nothing (a switch), int/float in a range, a choice, text."""

    kind: str  # none | int | float | choice | text
    low: float = 0
    high: float = 0
    choices: tuple[str, ...] = ()
    max_len: int = 0

    def problem(self, value: str) -> str | None:
        """Why `value` is not acceptable, or None."""
        if self.kind == "int":
            if not _INT_RE.fullmatch(value):
                return f"{value!r} is not an integer"
            number = int(value)
            if not self.low <= number <= self.high:
                return f"{number} is outside {self.low:g} to {self.high:g}"
        elif self.kind == "float":
            if not _FLOAT_RE.fullmatch(value):
                return f"{value!r} is not a number"
            real = float(value)
            if not math.isfinite(real) or not self.low <= real <= self.high:
                return f"{value} is outside {self.low:g} to {self.high:g}"
        elif self.kind == "choice":
            if value not in self.choices:
                return f"{value!r} is not one of {', '.join(self.choices)}"
        elif self.kind == "text" and len(value) > self.max_len:
            return f"the value is longer than {self.max_len} characters"
        return None


@dataclass(frozen=True)
class FlagRules:
    allowed: dict[str, ValueSpec]
    managed: dict[str, str]
    denied: dict[str, str]


class FlagError(Exception):
    """extra_args[index] is refused: problem and fix, for the catalog's one-line message."""

    def __init__(self, index: int, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.index, self.problem, self.fix = index, problem, fix


def _spec(flag: str, raw: Any) -> ValueSpec:
    if raw in ({}, None):
        return ValueSpec("none")
    if isinstance(raw, dict) and len(raw) == 1:
        kind, arg = next(iter(raw.items()))
        if kind in ("int", "float") and isinstance(arg, list) and len(arg) == 2:
            return ValueSpec(kind, low=arg[0], high=arg[1])
        if kind == "choice" and isinstance(arg, list) and arg:
            return ValueSpec("choice", choices=tuple(str(c) for c in arg))
        if kind == "text" and isinstance(arg, int) and arg > 0:
            return ValueSpec("text", max_len=arg)
    raise LlamavmError(
        f"{FLAGS_FILE}: allowed.{flag}: {raw!r} is not a value spec — see the header"
    )


@functools.cache
def rules(path: Path = FLAGS_FILE) -> FlagRules:
    """The rules in config/llama-server-flags.yaml (read once). Our own file, not an
    operator's: read with libyaml's loader (the pure-Python one took half a command's catalog
    check), not yamlsafe's bounded one."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise LlamavmError(f"{path}: cannot read the flag allow-list: {exc}") from None
    if not isinstance(data, dict):
        raise LlamavmError(f"{path}: expected allowed/managed/denied mappings")
    sections = {key: data.get(key) or {} for key in ("allowed", "managed", "denied")}
    for key, section in sections.items():
        if not isinstance(section, dict) or not all(_FLAG_RE.fullmatch(str(f)) for f in section):
            raise LlamavmError(f"{path}: {key}: every key must be a flag like --name or -n")
    overlap = set(sections["allowed"]) & (set(sections["managed"]) | set(sections["denied"]))
    if overlap:
        raise LlamavmError(f"{path}: {sorted(overlap)[0]} is both allowed and managed/denied")
    return FlagRules(
        allowed={flag: _spec(flag, raw) for flag, raw in sections["allowed"].items()},
        managed={flag: str(key) for flag, key in sections["managed"].items()},
        denied={flag: str(why) for flag, why in sections["denied"].items()},
    )


def check(args: Sequence[str], flag_rules: FlagRules | None = None) -> None:
    """Raise FlagError for the first argument that is not allowed."""
    r = flag_rules or rules()
    seen: dict[str, int] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if not _FLAG_RE.fullmatch(flag):
            raise FlagError(
                i, f"{arg!r} is not a flag", "put values right after the flag they belong to"
            )
        if flag in r.managed:
            raise FlagError(
                i, f"{flag} is set by llamavm", f"use the catalog key {r.managed[flag]}"
            )
        if flag in r.denied:
            raise FlagError(i, f"{flag} is refused: {r.denied[flag]}", "remove it")
        spec = r.allowed.get(flag)
        if spec is None:
            raise FlagError(
                i,
                f"{flag} is not on llamavm's allow-list of llama-server flags",
                "use a flag listed in config/llama-server-flags.yaml (add one there only if the "
                "pinned llama-server has it and it is safe to expose)",
            )
        if flag in seen:
            raise FlagError(i, f"{flag} is given twice (also at [{seen[flag]}])", "keep one")
        seen[flag] = i
        if spec.kind == "none":
            if eq:
                raise FlagError(i, f"{flag} takes no value", f"write {flag} alone")
        else:
            if not eq:
                if i + 1 >= len(args):
                    raise FlagError(i, f"{flag} needs a value", f"add the value after {flag}")
                i += 1
                value = args[i]
            bad = spec.problem(value)
            if bad:
                raise FlagError(i, f"{flag}: {bad}", "fix the value")
        i += 1
