"""The CLI edge: turn llamavm errors into one-line messages and exit codes, never tracebacks."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from invoke.exceptions import Exit

from llamavm.errors import LlamavmError

F = TypeVar("F", bound=Callable[..., Any])

#: Exit code of a task whose parts arrive with a later issue.
NOT_YET = 3


def errors_to_exit(func: F) -> F:
    """Wrap a task body: LlamavmError -> `llamavm: <message>` on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LlamavmError as exc:
            lines = str(exc).split("\n")
            detail = "\n".join([*lines[1:], getattr(exc, "detail", "") or ""]).strip()
            if detail:  # context first, so the last line stays the one-line error
                print("\n".join(f"  | {line}" for line in detail.splitlines()), file=sys.stderr)
            message = " ".join(lines[0].split())
            raise Exit(f"llamavm: {message}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("llamavm: interrupted", code=130) from None

    return wrapper  # type: ignore[return-value]


def not_yet(what: str, issue: int) -> Exit:
    return Exit(
        f"llamavm: {what} is not built yet — it arrives with issue #{issue}; "
        "see README 'Status of the parts'",
        code=NOT_YET,
    )


def say(text: str) -> None:
    print(text, flush=True)


def warn(text: str) -> None:
    print(f"llamavm: {text}", file=sys.stderr, flush=True)
