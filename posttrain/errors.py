"""Error types that say where a problem is and how to fix it.

Every error posttrain raises on bad input is one of these. The command line prints ``str(error)``
as one line and exits with status 2.
"""

from __future__ import annotations

from typing import Any


class PosttrainError(Exception):
    """Base class of every error posttrain raises on purpose."""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DataError(PosttrainError, ValueError):
    """A dataset does not have the shape a method needs.

    The message reads ``<source>, row <n>, column '<c>': <problem>; expected <x>, found <y>. Fix: <fix>``,
    with each part present only when known. ``row`` is 0-based, as in ``dataset[row]``. A problem found
    while reading a file, before it has rows, gives its 1-based ``line`` instead (``<source>, line <n>``),
    as an editor numbers it.
    """

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        row: int | None = None,
        line: int | None = None,
        column: str | None = None,
        expected: str | None = None,
        found: Any = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.source = source
        self.row = row
        self.line = line
        self.column = column
        self.expected = expected
        self.found = found
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.source:
            where.append(str(self.source))
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.column is not None:
            where.append(f"column '{self.column}'")
        text = (", ".join(where) + ": " if where else "") + self.problem
        if self.expected is not None:
            text += f"; expected {self.expected}"
            if self.found is not None:
                text += f", found {self.found if isinstance(self.found, str) else _short(self.found)}"
        elif self.found is not None:
            text += f"; found {self.found if isinstance(self.found, str) else _short(self.found)}"
        if self.fix:
            text += f". Fix: {self.fix}"
        return text


class ConfigError(PosttrainError, ValueError):
    """A configuration value cannot work; names the field (or flag) and the fix."""

    def __init__(self, problem: str, *, field: str | None = None, fix: str | None = None) -> None:
        self.problem = problem
        self.field = field
        self.fix = fix
        text = (f"--{field}: " if field else "") + problem
        if fix:
            text += f". Fix: {fix}"
        super().__init__(text)


class RolloutMismatchError(PosttrainError, RuntimeError):
    """The sampler and the trainer disagree about tokens on which they should agree; says the likely cause."""


class RewardFunctionError(PosttrainError, RuntimeError):
    """A user reward function raised or returned something unusable; names the function."""
