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


def _scenarios() -> dict[Path, dict]:
    """Every Molecule scenario `invoke test` runs: molecule/*/ and molecule/vm/*/ (its glob)."""
    from llamavm.commands import testing

    found = {}
    for pattern in ("molecule/*/molecule.yml", testing.MOLECULE_VM_GLOB):
        for path in sorted(REPO_ROOT.glob(pattern)):
            found[path.parent] = yaml.safe_load(path.read_text())
    return found


def _converged_roles(scenario: Path) -> set[str]:
    plays = yaml.safe_load((scenario / "converge.yml").read_text())
    return {
        (r["role"] if isinstance(r, dict) else r) for play in plays for r in play.get("roles", [])
    }


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_every_role_has_a_molecule_scenario_that_invoke_test_runs(role: Path) -> None:
    scenarios = _scenarios()
    owners = [s for s in scenarios if role.name in _converged_roles(s)]
    # A role's own scenario is named after it (base and hypervisor: their glob's default).
    own = [s for s in owners if s.name == role.name or s.name == "default"]
    assert own, f"no Molecule scenario converges the {role.name} role"
    steps = scenarios[own[0]]["scenario"]["test_sequence"]
    assert {"converge", "idempotence", "verify"} <= set(steps), (own[0], steps)
    assert scenarios[own[0]]["verifier"]["name"] == "testinfra"
    assert list((own[0] / "tests").glob("test_*.py")), f"{own[0]}: no testinfra checks"
