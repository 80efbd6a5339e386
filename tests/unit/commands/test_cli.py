"""The CLI edge: one line and an exit code for every llamavm error; the log tails it carries
are printed as context before that line, never dropped."""

from __future__ import annotations

import pytest
from invoke.exceptions import Exit

from llamavm.commands.cli import errors_to_exit
from llamavm.errors import LlamavmError
from llamavm.inputs.catalog import CatalogError


def _raise(exc: Exception):
    @errors_to_exit
    def body() -> None:
        raise exc

    return body


def test_detail_is_printed_before_the_one_line_error(capsys) -> None:
    error = LlamavmError("testbed: switch failed — see above", code=4, detail="line 1\nline 2")
    with pytest.raises(Exit) as caught:
        _raise(error)()
    assert caught.value.message == "llamavm: testbed: switch failed — see above"
    assert caught.value.code == 4
    assert capsys.readouterr().err.splitlines() == ["  | line 1", "  | line 2"]


def test_a_multi_line_message_keeps_its_tail_as_context(capsys) -> None:
    with pytest.raises(Exit) as caught:
        _raise(LlamavmError("debootstrap failed (exit 1)\nE: no such suite"))()
    assert caught.value.message == "llamavm: debootstrap failed (exit 1)"
    assert "  | E: no such suite" in capsys.readouterr().err


def test_a_plain_error_is_exactly_one_line(capsys) -> None:
    with pytest.raises(Exit) as caught:
        _raise(CatalogError("models.yaml: port: bad — fix it"))()
    assert caught.value.code == 2
    assert capsys.readouterr().err == ""


def test_lint_without_the_test_tools_says_how_to_get_them(tmp_path, monkeypatch, capsys) -> None:
    """`scripts/bootstrap provision` leaves the test tools out of the venv: `invoke lint` and
    `invoke test` say in one line how to install them, and run nothing."""
    import invoke

    from llamavm.commands import testing

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ruff").touch()
    monkeypatch.setattr(testing.sys, "executable", str(tmp_path / "bin" / "python"))
    ran = []
    monkeypatch.setattr(testing.subprocess, "run", lambda *a, **k: ran.append(a))
    for body in (testing.lint, testing.test):
        with pytest.raises(Exit) as caught:
            body(invoke.Context())
        assert caught.value.code == 1
        assert caught.value.message.startswith(f"llamavm: {tmp_path}/bin: no pytest, molecule ")
        assert "./scripts/bootstrap test" in caught.value.message
    assert ran == []
