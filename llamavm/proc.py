"""Run a tool and fail with its output: the controller's one helper for an external tool whose
failure ends what it was doing.

`run` runs the command; when it exits non-zero it raises the caller's error type (LlamavmError or
a subclass) as "WHAT failed (exit N): TAIL", TAIL being the end of what the tool said (its
output and errors together, the last lines on one line, unless the caller says otherwise).
With `log`, the tool writes to that file instead (after a `$ command` line) and the error
names the log, its last lines the error's detail. Starting the tool is not the helper's to
judge: a missing tool or a timeout raises what subprocess raises.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llamavm.errors import LlamavmError

#: How much of what the tool said goes into the error: lines of its output, lines of its log.
TAIL_LINES = 8
LOG_TAIL_LINES = 15

Tail = Callable[["subprocess.CompletedProcess[str]"], str]


def lines_tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of `text`, on one line."""
    return " | ".join(text.strip().splitlines()[-lines:])


def run(
    cmd: Sequence[str],
    what: str,
    *,
    error: type[LlamavmError] = LlamavmError,
    log: Path | None = None,
    tail: Tail | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` (text mode; `kwargs` go to subprocess.run: cwd, env, timeout, stdout, stderr);
    raise `error` when it exits non-zero.

    Without `log` its output is captured, errors into it, unless `kwargs` route them
    elsewhere; `tail` picks what of the finished process the message ends with (default: the
    last TAIL_LINES lines of its output, on one line). With `log`, its output and errors are
    appended to that file and the error says "; log LOG", with the log's last LOG_TAIL_LINES
    lines as its detail."""
    argv = list(cmd)
    if log is not None:
        with log.open("a") as handle:
            handle.write(f"\n$ {' '.join(argv)}\n")
            handle.flush()
            done = subprocess.run(
                argv, stdout=handle, stderr=subprocess.STDOUT, text=True, check=False, **kwargs
            )
        if done.returncode != 0:
            detail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
            raise error(f"{what} failed (exit {done.returncode}); log {log}", detail=detail)
        return done
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.STDOUT)
    done = subprocess.run(argv, text=True, check=False, **kwargs)
    if done.returncode != 0:
        said = tail(done) if tail is not None else lines_tail(done.stdout or "")
        raise error(f"{what} failed (exit {done.returncode}): {said}")
    return done
