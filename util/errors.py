"""Errors a user can fix, and the entry-point wrapper that prints them as one line."""
from __future__ import annotations


class ReportableError(Exception):
    """An error whose message alone tells the user what is wrong; entry points print it without a traceback."""


class UsageError(ReportableError, ValueError):
    """A flag value that cannot work; the message names the flag."""


class CheckpointError(ReportableError):
    """A checkpoint that cannot be read, written or used; the message names the file and the reason."""


class NonFiniteError(ReportableError):
    """Weights, features or outputs that are NaN or infinite: no accuracy can be computed from them."""


def run_entry_point(main, args) -> None:
    """Call ``main(args)``; a ``ReportableError`` (also one re-raised from a DataLoader worker) exits with
    ``error: <message>`` on one line and exit status 1."""
    try:
        main(args)
    except ReportableError as e:
        message = str(e).strip().splitlines()[-1]  # a worker's error arrives with its traceback in front
        message = message.removeprefix(f"{type(e).__module__}.{type(e).__name__}: ")
        raise SystemExit(f"error: {message}") from None
    finally:
        import torch.distributed as dist  # here, not at the top: the flags' module imports this one before torch loads

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
