class LlamavmError(Exception):
    """An error with a message an operator can act on; the CLI prints it in one line and exits.

    `detail` (a journal tail, a log excerpt) is printed before that line, as context.
    """

    exit_code = 1

    def __init__(self, message: str, *, code: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        if code is not None:
            self.exit_code = code
        self.detail = detail
