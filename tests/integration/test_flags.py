"""The extra_args allow-list holds for the pinned llama-server: every flag it names (allowed,
managed or refused) is one that build's --help lists, so a new pin can't make an entry mean
nothing — or something else."""

from __future__ import annotations

import re

import pytest

from llamavm.inputs import flags
from tests.integration.helpers import host_run

pytestmark = pytest.mark.testbed


@pytest.fixture(scope="module")
def help_flags(provisioned) -> set[str]:
    result = host_run("/opt/llama.cpp/current/bin/llama-server --help 2>&1")
    assert "--port" in result.stdout, result.stdout[-2000:]
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][A-Za-z0-9-]*)", result.stdout))


@pytest.mark.parametrize("section", ["allowed", "managed", "denied"])
def test_every_flag_of_the_allow_list_is_in_the_pinned_help(help_flags, section) -> None:
    listed = set(getattr(flags.rules(), section))
    missing = sorted(listed - help_flags)
    assert missing == [], f"{section} flags the pinned llama-server does not have: {missing}"


def test_the_dangerous_flags_exist_and_are_refused(help_flags) -> None:
    rules = flags.rules()
    for flag in ("--tools", "--agent", "--slot-save-path", "--props", "--mcp-servers-config"):
        assert flag in help_flags
        assert flag in rules.denied and flag not in rules.allowed
