"""The CLI edge: one line and an exit code for every llamavm error; the log tails it carries
are printed as context before that line, never dropped."""

from __future__ import annotations

import pytest
from invoke.exceptions import Exit

from llamavm.catalog import CatalogError
from llamavm.cli import errors_to_exit
from llamavm.errors import LlamavmError


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
