"""Errors a user can fix: each message alone tells what is wrong, so entry points print it as one line
(``util.run.process.run_entry_point``). A leaf module: it imports nothing of the project."""

from __future__ import annotations


class ReportableError(Exception):
    """An error whose message alone tells the user what is wrong; entry points print it without a traceback."""


class UsageError(ReportableError, ValueError):
    """A flag value that cannot work; the message names the flag."""


def first_line(error: BaseException, last: bool = False) -> str:
    """The first (or last) non-empty line of ``str(error)``, or the exception's class name when it has no text
    (``EOFError()`` of a 0-byte file): safe to put in a one-line message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if last else lines[0]) if lines else type(error).__name__


class DataError(ReportableError):
    """An input file (image, dataset description) that cannot be used; the message names the file."""


class CheckpointError(ReportableError):
    """A checkpoint that cannot be read, written or used; the message names the file and the reason."""


class NonFiniteError(ReportableError):
    """Weights, features or outputs that are NaN or infinite: no accuracy can be computed from them."""


class NonFiniteOutputError(NonFiniteError):
    """A model's outputs (logits, class scores) are NaN or infinite: no accuracy or mIoU can be computed from them."""
