class LlamavmError(Exception):
    """An error with a message an operator can act on; the CLI prints it in one line and exits."""

    exit_code = 1
