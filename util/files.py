"""Writing files safely: atomic replacement of a file, best-effort writes of small outputs, and md5 digests.

A leaf module: it imports nothing of the project but its error classes.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from util.errors import CheckpointError, first_line


def file_md5(path: str | os.PathLike) -> str:
    return _file_digest(path, hashlib.md5())


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (torch.hub's and torchgeo's weight-file hash)."""
    return _file_digest(path, hashlib.sha256())


def _file_digest(path: str | os.PathLike, digest) -> str:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``; on failure ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(
            tmp, 0o666 & ~umask
        )  # mkstemp creates 0600 (and some writers recreate the file): the mode open() would give
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        Path(tmp).unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise CheckpointError(f"could not write {path}: {reason}; the previous file, if any, is intact") from e
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def best_effort(path, write) -> bool:
    """Call ``write()``, which writes the small output file ``path`` (log, config, metrics, figure); an OSError
    (disk full, permissions) becomes ``warning: could not write PATH: REASON; continuing`` and False: a run that
    can continue, continues."""
    try:
        write()
        return True
    except OSError as e:
        print(
            f"warning: could not write {path}: {e.strerror or first_line(e)}; continuing", file=sys.stderr, flush=True
        )
        return False
