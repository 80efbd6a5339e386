"""A bounded YAML loader for operator-written files (the catalog, inventories' llamavm vars).

PyYAML's safe loader is safe from code execution, not from exhaustion: an alias bomb expands
to billions of nodes once anything walks the result, deep nesting overflows the recursion limit,
and a 5000-digit integer raises ValueError (Python's int/str conversion limit). This loader
refuses all of those while it composes, before any of that work is done, and raises
`YamlLimitError` / `yaml.YAMLError` with a message that names the line.
"""

from __future__ import annotations

from typing import Any

import yaml

#: Largest file accepted (bytes). A catalog with hundreds of models is a few tens of KiB.
MAX_BYTES = 256 * 1024
#: Deepest nesting of mappings and sequences.
MAX_DEPTH = 32
#: Most nodes the document may expand to, counting each use of an alias in full.
MAX_NODES = 50_000
#: Longest scalar that may become a number (digits, sign, prefix, separators).
MAX_NUMBER_CHARS = 32


class YamlLimitError(ValueError):
    """The document is beyond the loader's bounds; the message says which and where."""


def _where(node_or_event: Any) -> str:
    mark = getattr(node_or_event, "start_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"


class BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader with bounds on depth, expanded size, number length and duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        # Expanded size of every composed node, by id: an alias costs its target's full size.
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YamlLimitError(
                f"nesting deeper than {MAX_DEPTH} levels at {_where(self.peek_event())}"
            )
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes.get(id(child), 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(
                self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value
            )
        if size > MAX_NODES:
            raise YamlLimitError(
                f"the document expands to more than {MAX_NODES} nodes at {_where(node)} "
                "(an alias used too often?)"
            )
        self._sizes[id(node)] = size
        return node

    def construct_yaml_int(self, node: Any) -> int:
        if len(str(node.value)) > MAX_NUMBER_CHARS:
            raise YamlLimitError(
                f"the number at {_where(node)} has more than {MAX_NUMBER_CHARS} characters"
            )
        return int(super().construct_yaml_int(node))

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = key_node.value
                if key in seen:
                    raise YamlLimitError(f"duplicate key {key!r} at {_where(key_node)}")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


BoundedSafeLoader.add_constructor("tag:yaml.org,2002:int", BoundedSafeLoader.construct_yaml_int)


def load(text: str) -> Any:
    """Parse one YAML document within the bounds above."""
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise YamlLimitError(f"the file is larger than {MAX_BYTES // 1024} KiB")
    loader = BoundedSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
