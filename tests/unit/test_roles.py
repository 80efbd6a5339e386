"""Every role's public interface: argument specs that document each default with its value,
role-prefixed variables, templates that say they are managed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llamavm import REPO_ROOT

ROLES = sorted(p for p in (REPO_ROOT / "ansible" / "roles").iterdir() if p.is_dir())


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_argument_specs_match_the_defaults(role: Path) -> None:
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert set(options) == set(defaults), role.name
    for name, opt in options.items():
        assert name.startswith(f"{role.name}_"), name
        assert opt.get("description"), name
        if not opt.get("required"):  # a required input has no default to document
            assert opt.get("default") == defaults[name], name
        assert opt["type"] in {"str", "bool", "int", "list", "dict", "path"}, name
        if opt["type"] == "list":
            assert "elements" in opt, name


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_templates_start_with_ansible_managed(role: Path) -> None:
    for tpl in (role / "templates").rglob("*.j2"):
        head = "\n".join(tpl.read_text().splitlines()[:2])
        assert "{{ ansible_managed | comment" in head, tpl


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_private_names_are_role_prefixed(role: Path) -> None:
    for path in (role / "tasks").glob("*.yml"):
        for task in yaml.safe_load(path.read_text()) or []:
            registered = task.get("register")
            if registered:
                assert registered.startswith(f"__{role.name}_"), f"{path.name}: {registered}"
