"""The one error type a user's mistake in a spec raises: it always names the file, line and field."""

from __future__ import annotations


class SpecError(ValueError):
    """A malformed spec. ``str()`` is one readable line: ``file:line: field: message``."""

    def __init__(self, message: str, *, file: str = "<spec>", line: int | None = None, field: str = "") -> None:
        self.file = file
        self.line = line
        self.field = field
        self.message = message
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")
