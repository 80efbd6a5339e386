"""The shape of the llamavm package, from its own imports (every `import` in a module, those
inside functions too): no import circles, and the embedded test bed imported only by what may
(the commands: llamavm/commands/, whose tasks tasks.py assembles; the tests, bench/). The on-host
package's own rule (it imports only itself, the standard library and the host's Debian packages)
is tests/unit/artifacts/test_hostpkg.py's. And what tasks.py imports at start-up leaves out what
only some tasks need (they import it themselves), so that a quick `invoke switch` does not pay
for it.

Issue 35 takes the package apart along these lines. Until it has, KNOWN_TESTBED_IMPORTERS lists
what imports the test bed today, exactly: a new importer fails, and so does one that no longer
does but is still listed (strike it off here)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from llamavm import REPO_ROOT

PACKAGE = REPO_ROOT / "llamavm"
#: The embedded default target, the package and every module of it: built on this machine for
#: the tests and the README's first command, never needed on an operator's own hosts.
TESTBED = "llamavm.testbed"
#: The commands (the Invoke task bodies): they may drive the test bed (invoke testbed.*, the
#: default target's provision), as tasks.py did before them.
COMMANDS = "llamavm.commands"
#: Production modules that import the test bed today (issue 35 moves what they use).
KNOWN_TESTBED_IMPORTERS = {
    "llamavm.ops.doctor",
    "llamavm.ops.provision",
    "llamavm.platforms.vm.cloudinit",
    "llamavm.platforms.vm.vmbuild",
    "llamavm.platforms.vm.vmimage",
    "llamavm.platforms.wsl",
}


def is_testbed(name: str) -> bool:
    """Whether module `name` is the test bed's package or one of its modules."""
    return name == TESTBED or name.startswith(f"{TESTBED}.")


def is_command(name: str) -> bool:
    """Whether module `name` is the commands' package or one of its modules."""
    return name == COMMANDS or name.startswith(f"{COMMANDS}.")


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules `name` imports, anywhere in it (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    resolved = set()
    for target in targets:
        while target and target not in known:  # llamavm.host.x.y -> the module llamavm.host.x
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_imports_inside_functions_and_relative_ones() -> None:
    edges = graph()
    assert "llamavm.host.metrics" in edges["llamavm.host.cli"]  # imported inside a function
    assert edges["llamavm.host.control"] >= {"llamavm.host.protocol", "llamavm.host.upstream"}
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}
    assert circles({"a": {"b"}, "b": set()}) == set()


def test_no_import_circle() -> None:
    found = circles(graph())
    assert not found, f"import circles: {[sorted(c) for c in found]} — cut each at its seam"


def test_only_the_commands_are_let_off_the_test_bed_rule() -> None:
    assert is_command("llamavm.commands") and is_command("llamavm.commands.testbed")
    assert not is_command("llamavm.commandsx") and not is_command("llamavm.ops.provision")
    assert any(map(is_testbed, graph()["llamavm.commands.testbed"]))  # the rule is not idle


def test_the_test_bed_is_its_package_and_every_module_in_it() -> None:
    assert is_testbed("llamavm.testbed") and is_testbed("llamavm.testbed.lan")
    assert not is_testbed("llamavm.testbedx") and not is_testbed("llamavm.commands.testbed")
    inside = {name for name in modules() if is_testbed(name)}
    assert {"llamavm.testbed.machine", "llamavm.testbed.localinv"} <= inside


def test_only_the_known_modules_import_the_test_bed() -> None:
    edges = graph()
    importers = {
        n
        for n, deps in edges.items()
        if not is_testbed(n) and not is_command(n) and any(map(is_testbed, deps))
    }
    new = importers - KNOWN_TESTBED_IMPORTERS
    assert not new, f"{sorted(new)} import the test bed: production code must not"
    gone = KNOWN_TESTBED_IMPORTERS - importers
    assert not gone, f"no longer import the test bed (strike off): {sorted(gone)}"


def test_tasks_start_without_what_only_some_tasks_need() -> None:
    code = "import sys, tasks; print('\\n'.join(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    loaded = set(done.stdout.split())
    assert "llamavm.commands.serving" in loaded  # tasks.py's own import, so the check is real
    heavy = {"jinja2", "jsonschema", "ansible", "proxmoxer"}
    heavy |= {name for name in loaded if is_testbed(name)}
    heavy |= {
        "llamavm.platforms.vm.cloudinit",
        "llamavm.platforms.compose.site",
        "llamavm.platforms.compose.render",
        "llamavm.platforms.compose.engine",
        "llamavm.platforms.compose.project",
        "llamavm.platforms.compose.switchd",
        "llamavm.ops.doctor",
        "llamavm.platforms.proxmox",
        "llamavm.ops.provision",
    }
    assert not loaded & heavy, f"imported at every task's start: {sorted(loaded & heavy)}"
