"""Errors a user can act on.

Everything the user got wrong (a file, a flag, a shape) is an InputError: the
command line turns it into exit status 2 and one line on stderr, the widgets
into one notification. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from os import PathLike


class InputError(Exception):
    """A problem with the user's input, stated in one line naming the file."""

    def __init__(self, source: str | PathLike | None, problem: str):
        self.source = None if source is None else str(source)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(self.problem if self.source is None else f"{self.source}: {self.problem}")


def positive_number(source, value, what: str) -> float:
    """`value` as a finite float > 0, else an InputError saying `what` is wrong."""
    import math

    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(source, f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise InputError(source, f"{what} must be positive, got {value!r}")
    return number


class Cancelled(Exception):
    """The user stopped a long operation; finished work (cache chunks) is kept."""
