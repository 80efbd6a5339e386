"""llamavm.proc: run a tool and fail with its output — the message, its tail, the error type."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llamavm import proc
from llamavm.errors import LlamavmError

#: Thirty lines, on stdout and stderr by turns, then the exit code its argument names.
TALKER = (
    "import sys; [print('line', i, file=sys.stderr if i % 2 else sys.stdout, flush=True) "
    "for i in range(30)]; sys.exit(int(sys.argv[1]))"
)


class ToolError(LlamavmError):
    exit_code = 2


def test_a_tool_that_succeeds_returns_what_it_said() -> None:
    done = proc.run([sys.executable, "-c", TALKER, "0"], "talk")
    assert done.returncode == 0
    assert done.stdout.splitlines()[:2] == ["line 0", "line 1"]  # errors merged in, in order


def test_a_failure_names_the_step_the_exit_code_and_the_last_lines_of_output() -> None:
    with pytest.raises(LlamavmError) as caught:
        proc.run([sys.executable, "-c", TALKER, "3"], "pip download x")
    tail = " | ".join(f"line {i}" for i in range(22, 30))
    assert str(caught.value) == f"pip download x failed (exit 3): {tail}"
    assert type(caught.value) is LlamavmError and caught.value.exit_code == 1


def test_the_error_is_the_callers_type_and_the_tail_its_choice() -> None:
    with pytest.raises(ToolError, match=r"^unpack failed \(exit 3\): line 29$") as caught:
        proc.run(
            [sys.executable, "-c", TALKER, "3"],
            "unpack",
            error=ToolError,
            stderr=subprocess.PIPE,
            tail=lambda done: done.stderr.strip().splitlines()[-1],
        )
    assert caught.value.exit_code == 2


def test_with_a_log_the_output_goes_there_and_the_error_names_it(tmp_path) -> None:
    log = tmp_path / "build.log"
    log.write_text("earlier\n")
    cmd = [sys.executable, "-c", TALKER, "4"]
    with pytest.raises(LlamavmError) as caught:
        proc.run(cmd, "mkfs.ext4", log=log)
    assert str(caught.value) == f"mkfs.ext4 failed (exit 4); log {log}"
    lines = log.read_text().splitlines()
    assert lines[:3] == ["earlier", "", f"$ {' '.join(cmd)}"]
    assert caught.value.detail == "\n".join(lines[-proc.LOG_TAIL_LINES :])
    assert caught.value.detail.endswith("line 29")
    assert proc.run(["true"], "true", log=log).returncode == 0


def test_a_missing_tool_is_not_the_helpers_to_judge() -> None:
    with pytest.raises(FileNotFoundError):
        proc.run(["/nonexistent/llamavm-tool"], "tool")
