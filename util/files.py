"""Writing files safely: atomic replacement of a file, best-effort writes of small outputs, and md5 digests.

A leaf module: it imports nothing of the project but its error classes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sys
import tempfile
from pathlib import Path

from util.errors import CheckpointError, first_line


def file_problem(path: str | os.PathLike) -> str | None:
    """None where ``path`` is a regular file (or a link to one), else what it is: ``does not exist``, ``is a folder``,
    ``is a character device, not a regular file (a link to /dev/zero)``: a device or a pipe would be read forever or
    block, and must not be reported as missing."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist" + (" (a broken link)" if os.path.islink(path) else "")
    except OSError as e:
        return f"cannot be read ({e.strerror or first_line(e)})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"))
    kind = next((name for test, name in kinds if test(mode)), "a special file")
    link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
    return f"is {kind}, not a regular file{link}"


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


# errno values of a directory fsync that a file system does not support (FUSE and object-store mounts: EINVAL; CIFS:
# ENOTSUP; systems that fsync no folder opened read-only: EBADF, as PostgreSQL's fsync_fname ignores) or of a folder
# that can be written but not opened (mode -wx: EACCES): the rename is done and durable as far as they can make it.
UNSUPPORTED_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES)


def write_atomically(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``; on failure ``path`` is untouched and the temporary
    file is removed. The folder is fsynced after the rename where the file system can (not on FUSE / CIFS mounts).

    Raises:
        CheckpointError: ``could not write PATH: REASON; ...``; a full disk reads ``No space left on device`` also when
            the writer's own error does not say so (``failure_reason``).
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        write(tmp)
        os.chmod(
            tmp, 0o666 & ~umask
        )  # mkstemp creates 0600 (and some writers recreate the file): the mode open() would give
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        why = failure_reason(e, path.parent)  # before the temporary file is removed: it may be what filled the disk
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path}: {why}; the previous file, if any, is intact") from e
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno not in UNSUPPORTED_FSYNC:
            raise CheckpointError(f"wrote {path}, but could not make its folder durable: {e.strerror or e}") from e


def failure_reason(error: BaseException, folder: Path) -> str:
    """One line saying why a write into ``folder`` failed: an OSError's text, else the writer's own error, or ``No space
    left on device`` where the folder's file system has no byte left (writers such as torch.save to a path or
    safetensors report a full disk as ``unexpected pos 64 vs 0`` or an opaque serialisation error)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    try:
        full = os.statvfs(folder).f_bavail == 0
    except OSError:
        full = False
    return f"No space left on device ({first_line(error)})" if full else first_line(error)


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
