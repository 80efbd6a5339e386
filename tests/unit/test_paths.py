"""The controller's folders have one owner (llamavm/paths.py) and one rule for the variables."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llamavm import REPO_ROOT, paths

ROOTS = [
    (paths.cache, paths.CACHE_ENV, Path("/var/cache/llamavm")),
    (paths.state, paths.STATE_ENV, Path("/var/lib/llamavm")),
]


@pytest.mark.parametrize(("root", "env", "default"), ROOTS)
def test_a_root_is_its_variable_when_set_and_its_default_when_unset_or_empty(
    monkeypatch, root, env, default
):
    monkeypatch.setenv(env, "/x/y")
    assert root() == Path("/x/y")
    monkeypatch.setenv(env, "")
    assert root() == default
    monkeypatch.delenv(env)
    assert root() == default


def test_every_named_folder_lies_under_its_root_and_follows_the_variables(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "c"))
    monkeypatch.setenv(paths.STATE_ENV, str(tmp_path / "s"))
    cached = [paths.gguf_headers(), paths.checked_catalogs(), paths.inventories(),
              paths.file_digests(), paths.cloud_init_schemas(), paths.host_packages(),
              paths.vm_images(), paths.vm_renders("inv"), paths.wsl_builds("inv"),
              paths.rootfs(), paths.models(), paths.canary()]  # fmt: skip
    kept = [paths.keys(), paths.converged(), paths.compose_projects(), paths.testbed(),
            paths.fleet(), paths.local_vms()]  # fmt: skip
    assert all(p.parent.is_relative_to(tmp_path / "c") for p in cached)
    assert all(p.parent == tmp_path / "s" for p in kept)
    assert len(set(cached + kept)) == len(cached + kept)


def _strings(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module, its docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    ]


def test_no_other_controller_module_reads_the_variables_or_spells_a_root():
    """The controller's package and bench/ (the host's paths are the contract's, and
    llamavm/host/ never sees the controller's folders)."""
    offenders = []
    for path in [*(REPO_ROOT / "llamavm").rglob("*.py"), *(REPO_ROOT / "bench").rglob("*.py")]:
        if path == REPO_ROOT / "llamavm" / "paths.py":
            continue
        for number, text in _strings(path):
            if text in (paths.CACHE_ENV, paths.STATE_ENV) or any(
                str(root) in text for root in (paths.DEFAULT_CACHE, paths.DEFAULT_STATE)
            ):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {text!r}")
    assert not offenders, "\n".join(offenders)
