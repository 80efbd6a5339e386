"""Validating operator-written data against a JSON Schema, with one-line messages.

Shared by every input file llamavm reads (the catalog, VM specs): a walk that refuses control
characters in every string and key, the schema's verdict on the first problem in document
order, and each problem phrased as `where: problem — fix`, the fix taken from the schema's
`x-fix` (and the problem from `x-problem`) next to the rule that failed.
"""

from __future__ import annotations

import copy
import functools
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jsonschema

# jsonschema is imported when a file is first checked (a third of a command's start-up, and a
# catalog already checked is not checked again: catalog.parse).

#: Unicode categories refused in every string: controls (newline, tab, ESC, DEL, C1), line and
#: paragraph separators, and invisible format characters (bidi overrides, zero-width spaces).
REFUSED_CATEGORIES = {"Cc", "Cf", "Zl", "Zp"}
TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
    "boolean": "a boolean",
    "number": "a number",
}

#: fail(path parts, problem, fix) -> the exception to raise
Fail = Callable[[list[Any], str, str], Exception]


def _is_int(checker: Any, value: Any) -> bool:
    # YAML booleans are ints and 8001.0 is "integral" to JSON Schema: neither is a port.
    return isinstance(value, int) and not isinstance(value, bool)


@functools.cache
def _validator() -> Any:
    import jsonschema

    return jsonschema.validators.extend(
        jsonschema.Draft202012Validator,
        type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_int),
    )


def describe(value: Any) -> str:
    """What kind of value this is, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        if value != value:
            return "not a number"
        return (
            "an infinite number" if value in (float("inf"), float("-inf")) else "a decimal number"
        )
    return {str: "a string", int: "an integer", list: "a list", dict: "a mapping"}.get(
        type(value), f"a {type(value).__name__} value"
    )


def short(value: Any) -> str:
    """repr(value), at most 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def refuse_control_characters(fail: Fail, node: Any, parts: list[Any] | None = None) -> None:
    """Raise fail(...) for the first string or key holding a control character."""
    parts = parts or []
    if isinstance(node, str):
        for char in node:
            if unicodedata.category(char) in REFUSED_CATEGORIES:
                raise fail(
                    parts,
                    f"{short(node)} contains the control character U+{ord(char):04X}",
                    "remove it: values must be one line of printable text",
                )
    elif isinstance(node, dict):
        for key, value in node.items():
            refuse_control_characters(fail, key, [*parts, f"<key {short(key)}>"])
            refuse_control_characters(fail, value, [*parts, key])
    elif isinstance(node, list):
        for i, value in enumerate(node):
            refuse_control_characters(fail, value, [*parts, i])


def _document_order(data: Any, parts: list[Any]) -> tuple[int, ...]:
    """Position of a path in the file (keys in written order, list items by index)."""
    out, node = [], data
    for part in parts:
        if isinstance(node, dict):
            keys = list(node)
            out.append(keys.index(part) if part in keys else len(keys))
        else:
            out.append(part if isinstance(part, int) else 0)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return tuple(out)


def check(fail: Fail, schema: dict[str, Any], data: Any, schema_name: str) -> None:
    """Raise fail(...) for the first schema violation in document order."""
    import jsonschema

    validator = _validator()(schema, format_checker=jsonschema.FormatChecker(["ipv4", "ipv6"]))
    errors = list(validator.iter_errors(data))
    if not errors:
        return
    first = min(
        errors, key=lambda e: (_document_order(data, list(e.absolute_path)), len(e.absolute_path))
    )
    raise fail(*problem(first, schema_name))


def problem(error: jsonschema.ValidationError, schema_name: str) -> tuple[list[Any], str, str]:
    """(where, problem, fix) of one schema violation."""
    sub = error.schema if isinstance(error.schema, dict) else {}
    parts = list(error.absolute_path)
    value = error.instance
    fix = sub.get("x-fix", f"see {schema_name}")
    kind = error.validator
    if kind == "required":
        missing = next(k for k in error.validator_value if k not in value)
        return [*parts, missing], "is missing", "this key is required"
    if kind == "additionalProperties":
        allowed = list(sub.get("properties", {}))
        extra = next(k for k in value if k not in allowed)
        return (
            [*parts, extra],
            "unknown key",
            f"remove it or fix its spelling (allowed keys: {', '.join(allowed)})",
        )
    if kind == "type":
        types = error.validator_value
        words = " or ".join(TYPE_WORDS[t] for t in (types if isinstance(types, list) else [types]))
        return parts, f"{short(value)} is {describe(value)}", f"it must be {words}"
    if kind == "minimum":
        return parts, f"{value} is below {error.validator_value}", fix
    if kind == "maximum":
        return parts, f"{value} is above {error.validator_value}", fix
    if kind == "minItems" and not value:
        return parts, "the list is empty", fix
    if kind in ("minItems", "maxItems", "maxProperties"):
        word = "fewer" if kind == "minItems" else "more"
        return parts, f"has {word} than {error.validator_value} entries", fix
    if kind in ("maxLength", "minLength"):
        word = "longer" if kind == "maxLength" else "shorter"
        return parts, f"is {word} than {error.validator_value} characters", fix
    if kind == "propertyNames":
        return parts, f"key {short(value)} is not a valid name", fix
    return parts, f"{short(value)} {sub.get('x-problem', 'is not valid')}", fix


def with_defaults(node: dict[str, Any], node_schema: dict[str, Any]) -> dict[str, Any]:
    """`node` with the schema's defaults filled in for absent keys (one level)."""
    out = dict(node)
    for key, sub in node_schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
    return out


#: Folders a share must never be mounted on: the system's own (mounted there, it hides them).
#: SYSTEM_TREES: folders a share must not be mounted inside either (it would hide part of the
#: system); inside /home, /root, /var, /tmp, /opt, /srv or /mnt is fine.
SYSTEM_FOLDERS = (
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root",
    "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/cache", "/var/lib",
    "/var/log", "/var/tmp", "/mnt", "/media",
)  # fmt: skip
SYSTEM_TREES = (
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr",
    "/var/cache", "/var/lib", "/var/log",
)  # fmt: skip


def mount_point_problem(path: str) -> str | None:
    """Why a share mounted at the absolute `path` would hide part of the system, or None."""
    parts = path.split("/")[1:]
    if any(part in (".", "..") for part in parts):
        return f"{short(path)} has a '.' or '..' part (say the folder itself)"
    clean = "/" + "/".join(part for part in parts if part)
    if clean in SYSTEM_FOLDERS:
        return f"{short(path)} would hide the system folder {clean}"
    for tree in SYSTEM_TREES:
        if clean.startswith(tree + "/"):
            return f"{short(path)} is inside the system folder {tree}"
    return None
