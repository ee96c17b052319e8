"""The files of a data set's distribution as its authors publish it: a folder, a ``.zip`` or a ``.tar`` (``.gz``,
``.bz2``, ``.xz``), and the archives inside them, read in place without unpacking everything first.

Every file gets a virtual POSIX path: the name of the folder or archive given, then its path inside; a file of an
archive that is itself inside a folder or archive gets ``outer/inner.zip/path`` (ISPRS Potsdam ships zips inside a
zip). Inner archives of an archive are copied once to a cache folder to be read (random access into a compressed
member would decompress it again for every file). RAR and 7-Zip archives (RESISC45's original ``NWPU-RESISC45.rar``)
cannot be read with Python's standard library: unpack them (``unrar x``, ``7z x``) and give the folder.

Used by ``tools/prepare_benchmark.py``; ``verify_checksums`` checks published md5s, ``materialize`` brings members
to disk (atomically, skipping those already there: an interrupted run resumes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from util.errors import DataError
from util.files import write_atomically

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
UNREADABLE_SUFFIXES = {".rar": "unrar x", ".7z": "7z x"}
CHUNK = 1 << 20  # bytes per read when copying and hashing (1 MiB)


def archive_suffix(name: str) -> str | None:
    """The archive suffix of a file name (``.tar.gz`` before ``.gz``), or None."""
    lower = name.lower()
    return next((s for s in ARCHIVE_SUFFIXES if lower.endswith(s)), None)


class Container:
    """A folder or an archive: its files, and a way to read each."""

    label: str

    def files(self) -> Iterator[tuple[str, int, int]]:
        """(name inside, size in bytes, position for in-order reading) of every regular file."""
        raise NotImplementedError

    def open(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def local_path(self, name: str) -> Path | None:
        """The file on disk, when the container is a folder."""
        return None


class FolderContainer(Container):
    def __init__(self, root: Path, exclude: Sequence[Path] = ()) -> None:
        self.root, self.label = root, root.name
        self.exclude = {p.resolve() for p in exclude}

    def files(self) -> Iterator[tuple[str, int, int]]:
        for index, path in enumerate(self._walk(self.root)):
            yield path.relative_to(self.root).as_posix(), path.stat().st_size, index

    def _walk(self, folder: Path) -> Iterator[Path]:
        try:
            entries = sorted(folder.iterdir())
        except OSError as e:
            raise DataError(f"{folder}: cannot list the folder ({e.strerror})") from None
        for entry in entries:
            if entry.name.startswith(".") or entry.resolve() in self.exclude:
                continue
            if entry.is_dir():
                yield from self._walk(entry)
            elif entry.is_file():
                yield entry

    def open(self, name: str) -> BinaryIO:
        return open(self.root / name, "rb")

    def local_path(self, name: str) -> Path:
        return self.root / name


class ZipContainer(Container):
    def __init__(self, path: Path, label: str) -> None:
        self.label = label
        try:
            self.zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{label}: not a readable zip archive ({e}); the download may be incomplete") from None

    def files(self) -> Iterator[tuple[str, int, int]]:
        for info in self.zip.infolist():
            if not info.is_dir():
                yield info.filename, info.file_size, info.header_offset

    def open(self, name: str) -> BinaryIO:
        return self.zip.open(name)


class TarContainer(Container):
    def __init__(self, path: Path, label: str) -> None:
        self.label = label
        try:
            self.tar = tarfile.open(path, "r:*")
            self.members = {m.name: m for m in self.tar if m.isfile()}  # one pass over the whole archive
        except (OSError, tarfile.TarError, EOFError) as e:
            raise DataError(f"{label}: not a readable tar archive ({e}); the download may be incomplete") from None

    def files(self) -> Iterator[tuple[str, int, int]]:
        for name, member in self.members.items():
            yield name, member.size, member.offset_data

    def open(self, name: str) -> BinaryIO:
        return self.tar.extractfile(self.members[name])


@dataclass(frozen=True)
class Member:
    """One file of a distribution."""

    path: str  # virtual path: container label / name inside
    size: int  # bytes
    container: Container
    name: str  # name inside the container
    order: int  # position in the container: reading in this order is one forward pass

    @property
    def basename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> str:
        """The virtual path of the folder holding it ('' at the top)."""
        return self.path.rsplit("/", 1)[0] if "/" in self.path else ""

    def local_path(self) -> Path | None:
        return self.container.local_path(self.name)


class Source:
    """Every file of the folders and archives given, inner archives opened (see the module docstring).

    Args:
        paths: Folders and archive files.
        cache: Folder for copies of archives found inside archives.
        exclude: Folders not to list (the output folder, when it lies inside a given folder).

    Raises:
        DataError: a path that does not exist, a RAR / 7-Zip archive, an unreadable archive, two inputs of one name.
    """

    def __init__(self, paths: Sequence[Path], cache: Path, exclude: Sequence[Path] = ()) -> None:
        self.cache, self.exclude = cache, exclude
        self.members: dict[str, Member] = {}
        self.archive_files: list[Path] = []  # archives read from disk (their checksums can be verified)
        labels = [Path(p).name for p in paths]
        if len(set(labels)) != len(labels):
            raise DataError(
                f"--archive: two inputs share a name ({', '.join(labels)}); their files could not be told apart"
            )
        for path in map(Path, paths):
            if path.is_dir():
                self._add(FolderContainer(path, exclude), "")
            elif path.is_file():
                self._add(self._open_archive(path, path.name), "")
            else:
                raise DataError(f"--archive {path}: no such file or folder")

    def _open_archive(self, path: Path, label: str) -> Container:
        suffix = archive_suffix(path.name)
        unreadable = next((s for s in UNREADABLE_SUFFIXES if path.name.lower().endswith(s)), None)
        if unreadable:
            raise DataError(
                f"--archive {label}: a {unreadable} archive, which Python cannot read without extra packages; "
                f"unpack it ({UNREADABLE_SUFFIXES[unreadable]} {path.name}) and give the folder as --archive"
            )
        if suffix is None:
            raise DataError(f"--archive {label}: neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        self.archive_files.append(path)
        return ZipContainer(path, label) if suffix == ".zip" else TarContainer(path, label)

    def _add(self, container: Container, prefix: str) -> None:
        base = f"{prefix}{container.label}/"
        for name, size, order in container.files():
            member = Member(base + name, size, container, name, order)
            suffix = archive_suffix(name)
            if suffix is None:
                if member.path in self.members:
                    raise DataError(f"--archive: {member.path} appears twice")
                self.members[member.path] = member
                continue
            inner_prefix = member.parent + "/"  # the inner archive's files: <its path>/<name inside>
            local = container.local_path(name)
            if local is not None:  # an archive lying in a folder: read (and verified) from disk
                self._add(self._open_archive(local, member.basename), inner_prefix)
                continue
            local = self.cache / (hashlib.md5(member.path.encode()).hexdigest()[:16] + suffix)
            if not (local.is_file() and local.stat().st_size == size):
                copy_member(member, local)
            self._add(
                ZipContainer(local, member.basename) if suffix == ".zip" else TarContainer(local, member.basename),
                inner_prefix,
            )

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members.values())


def copy_member(member: Member, destination: Path) -> None:
    """Write one member to ``destination`` atomically."""

    def write(tmp: str) -> None:
        try:
            with member.container.open(member.name) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
            raise DataError(
                f"{member.path}: cannot read it from its archive ({e}); the download may be incomplete"
            ) from None

    write_atomically(destination, write)


def materialize(
    members: Sequence[Member], destination: Callable[[Member], Path], in_place: bool = True, desc: str = "extracting"
) -> dict[str, Path]:
    """A file on disk for every member: the file itself when it lies in a folder (``in_place``), else a copy at
    ``destination(member)``, written atomically; a copy already there with the member's size is kept (resume).
    Members are read in archive order, so a compressed tar is read in one forward pass.

    Returns:
        {virtual path: file on disk}.
    """
    from util.run.logger import progress

    found: dict[str, Path] = {}
    todo = []
    for member in members:
        local = member.local_path() if in_place else None
        if local is not None:
            found[member.path] = local
            continue
        target = destination(member)
        found[member.path] = target
        if not (target.is_file() and target.stat().st_size == member.size):
            todo.append((member, target))
    todo.sort(key=lambda item: (id(item[0].container), item[0].order))
    for member, target in progress(todo, desc, unit="file"):
        copy_member(member, target)
    return found


def md5_with_progress(path: Path, desc: str) -> str:
    from util.run.logger import progress

    digest = hashlib.md5()
    size = path.stat().st_size

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            yield from iter(lambda: f.read(CHUNK), b"")

    for chunk in progress(chunks(), desc, total=-(-size // CHUNK), unit="MiB"):
        digest.update(chunk)
    return digest.hexdigest()


def verify_checksums(files: Sequence[Path], published: Mapping[str, tuple[str, str]], state: Path) -> list[str]:
    """Check each archive whose file name has a published md5; returns one note per file.

    Args:
        files: Archive files read from disk.
        published: {file name: (md5, who published or recorded it)}.
        state: JSON file remembering verified files (path, size, modification time), so a resumed run does not hash
            100 GB again.

    Raises:
        DataError: an md5 that differs from the published one.
    """
    try:
        known = json.loads(state.read_text()) if state.is_file() else {}
    except (OSError, ValueError):
        known = {}
    notes = []
    for path in files:
        if path.name not in published:
            notes.append(f"{path.name}: no published checksum known for this file name; not verified")
            continue
        expected, source = published[path.name]
        stat = path.stat()
        key = str(path.resolve())
        if known.get(key) == [stat.st_size, stat.st_mtime_ns, expected]:
            notes.append(f"{path.name}: md5 {expected} verified earlier ({source})")
            continue
        actual = md5_with_progress(path, f"md5 of {path.name}")
        if actual != expected:
            raise DataError(
                f"{path}: md5 {actual} does not match {expected} ({source}); the download is incomplete or "
                "another version (--no_verify skips this check)"
            )
        known[key] = [stat.st_size, stat.st_mtime_ns, expected]
        write_atomically(state, lambda tmp: Path(tmp).write_text(json.dumps(known, indent=1)))
        notes.append(f"{path.name}: md5 {actual} verified ({source})")
    return notes


def relative(path: Path, start: Path) -> str:
    """``path`` relative to the folder ``start``, POSIX separators (manifest paths)."""
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
