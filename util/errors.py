"""Errors a user can fix, and the entry-point wrapper that prints them as one line."""
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


def best_effort(path, write) -> bool:
    """Call ``write()``, which writes the small output file ``path`` (log, config, metrics, figure); an OSError
    (disk full, permissions) becomes ``warning: could not write PATH: REASON; continuing`` and False: a run that
    can continue, continues."""
    import sys

    try:
        write()
        return True
    except OSError as e:
        print(f"warning: could not write {path}: {e.strerror or first_line(e)}; continuing", file=sys.stderr, flush=True)
        return False


def run_entry_point(main, args) -> None:
    """Call ``main(args)``; a ``ReportableError`` (also one re-raised from a DataLoader worker) exits with
    ``error: <message>`` on one line and exit status 1."""
    try:
        main(args)
    except ReportableError as e:
        message = first_line(e, last=True)  # a worker's error arrives with its traceback in front
        message = message.removeprefix(f"{type(e).__module__}.{type(e).__name__}: ")
        raise SystemExit(f"error: {message}") from None
    finally:
        from util.runtime import release_output_dirs, stop_worker_processes  # here: util.runtime imports this module
        import torch.distributed as dist  # here, not at the top: the flags' module imports this one before torch loads

        stop_worker_processes()
        release_output_dirs()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
