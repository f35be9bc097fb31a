"""Unpack an uploaded model archive (.zip, .tar, .tar.gz/.tgz) safely into a fresh temporary folder.

Uploaded archives are untrusted. Any bad member rejects the whole archive (the temp folder is removed):
absolute paths, `..` components, drive letters, symlinks and hardlinks, device files, too many entries,
or a total uncompressed size over the cap (zip bombs, sparse tar members declaring terabytes). A zip's
members come from its central directory and are all checked before anything is written. A tar has no
directory: its members are read one header at a time and counted (entries and declared expanded bytes)
as they are read, so the first member over a limit stops the reading — an archive of millions of
entries is never listed whole. Member bytes are copied by hand with a running byte count, so even a
lying header cannot write more than the cap. The caller loads the folder with models.load_model.
"""
from __future__ import annotations

import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from lmcompress_core.models.loading import ModelError

MAX_ENTRIES = 64                 # a model folder has a handful of files
MAX_TOTAL_BYTES = 2 << 30        # 2 GiB uncompressed: above any model this CPU app can usefully load
CHUNK = 1 << 20


class ArchiveError(ModelError):
    """The archive was rejected; str(e) says why in one line (a ModelError, so callers catch one type)."""


@dataclass(frozen=True)
class _Member:
    """What the checks need to know about one archive entry, whatever the archive format."""

    name: str
    size: int
    is_dir: bool
    is_file: bool
    ref: object = None    # the archive's own entry (ZipInfo, TarInfo): opened directly, never looked up by name


def _safe_relative(name: str) -> PurePosixPath:
    """The member's path if it stays inside the extraction folder, else ArchiveError."""
    unified = name.replace("\\", "/")
    path = PurePosixPath(unified)
    if not unified or unified.startswith("/") or path.is_absolute() or (len(unified) > 1 and unified[1] == ":"):
        raise ArchiveError(f"archive rejected: absolute path {name!r}")
    if ".." in path.parts:
        raise ArchiveError(f"archive rejected: path {name!r} climbs out of the folder with '..'")
    return path


def _zip_members(archive: zipfile.ZipFile) -> list[_Member]:
    """Zip entries as _Member; a symlink (Unix mode bits in external_attr) rejects the archive."""
    members = []
    for info in archive.infolist():
        mode = (info.external_attr >> 16) & 0o170000
        if mode == 0o120000:  # the Unix mode bits say symlink
            raise ArchiveError(f"archive rejected: {info.filename!r} is a symbolic link")
        members.append(_Member(info.filename, info.file_size, info.is_dir(), not info.is_dir(), info))
    return members


def _tar_members(archive: tarfile.TarFile) -> Iterator[_Member]:
    """Tar entries as _Member, one header read per entry asked for (never the whole list: ``getmembers()``
    would read every header of the archive before any limit applies); links, devices and fifos reject it."""
    while (info := archive.next()) is not None:
        if info.issym() or info.islnk():
            raise ArchiveError(f"archive rejected: {info.name!r} is a link")
        if not (info.isfile() or info.isdir()):
            raise ArchiveError(f"archive rejected: {info.name!r} is a device, fifo or other special file")
        yield _Member(info.name, info.size, info.isdir(), info.isfile(), info)


class _Limits:
    """Entries and expanded bytes counted as members are read, and bytes as they are written; the first count
    over its limit rejects the archive."""

    def __init__(self, max_entries: int, max_total_bytes: int):
        self.max_entries, self.max_total_bytes = max_entries, max_total_bytes
        self.entries = self.declared = self.written = 0

    def admit(self, member: _Member) -> None:
        """Count one member read from the archive: its path, the entry count and its declared size."""
        _safe_relative(member.name)
        self.entries += 1
        if self.entries > self.max_entries:
            raise ArchiveError(f"archive rejected: more than {self.max_entries} entries (stopped reading at "
                               f"entry {self.entries})")
        self.declared += max(member.size, 0)
        if self.declared > self.max_total_bytes:
            raise ArchiveError(f"archive rejected: at least {self.declared:,} bytes uncompressed, at most "
                               f"{self.max_total_bytes:,} allowed")

    def charge(self, n_bytes: int) -> None:
        """Count bytes written: a lying size header still stops at the cap."""
        self.written += n_bytes
        if self.written > self.max_total_bytes:
            raise ArchiveError("archive rejected: uncompressed data exceeds the size cap")


def check_members(members: list[_Member], max_entries: int = MAX_ENTRIES,
                  max_total_bytes: int = MAX_TOTAL_BYTES) -> None:
    """All-or-nothing checks on a listed archive's declared entries (a zip's directory): count, paths, size."""
    limits = _Limits(max_entries, max_total_bytes)
    for member in members:
        limits.admit(member)


def _admitted(members: Iterator[_Member], limits: _Limits) -> Iterator[_Member]:
    """Members as they are read, each counted before it is handed on."""
    for member in members:
        limits.admit(member)
        yield member


def _copy_capped(source: BinaryIO, target: Path, limits: _Limits) -> None:
    """Copy bytes while charging them to the archive's running count."""
    with open(target, "xb") as out:
        while chunk := source.read(CHUNK):
            limits.charge(len(chunk))
            out.write(chunk)


def _open(path: Path, limits: _Limits):
    """(archive object, members to extract, opener of member bytes) for a zip or tar file: a zip's members
    checked whole first, a tar's read and counted one by one as extraction asks for them."""
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        members = _zip_members(archive)
        check_members(members, limits.max_entries, limits.max_total_bytes)
        return archive, members, lambda m: archive.open(m.ref)
    try:
        archive = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError):
        # tarfile's own message lists each compression it tried ("method gz: ReadError(...) - method bz2 ..."):
        # a person needs to know what the file should be, not which decoders failed
        raise ArchiveError("not a model archive: the file is neither a .zip nor a .tar / .tar.gz / .tar.bz2 / "
                           ".tar.xz archive") from None
    return archive, _admitted(_tar_members(archive), limits), lambda m: archive.extractfile(m.ref)


def _model_root(folder: Path) -> Path:
    """The folder holding config.json: the archive root, or its single top-level folder."""
    if (folder / "config.json").is_file():
        return folder
    children = [p for p in folder.iterdir()]
    if len(children) == 1 and children[0].is_dir() and (children[0] / "config.json").is_file():
        return children[0]
    raise ArchiveError("archive rejected: no config.json at its root or in a single top-level folder")


def _extract(members: Iterable[_Member], open_member, dest: Path, limits: _Limits) -> None:
    """Write each member under ``dest`` as it comes, its bytes counted (the caller removes dest on any error)."""
    for member in members:
        target = dest.joinpath(*_safe_relative(member.name).parts)
        if member.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_member(member) as source:
            _copy_capped(source, target, limits)


def extract_model_archive(path: str | Path, max_entries: int = MAX_ENTRIES,
                          max_total_bytes: int = MAX_TOTAL_BYTES) -> Path:
    """Check then extract `path` into a new temporary folder; return the folder holding config.json.

    On any rejection nothing is left behind (the temp folder is removed) and ArchiveError is raised.
    On success the caller owns the temp folder (remove it with shutil.rmtree when done).
    """
    dest = Path(tempfile.mkdtemp(prefix="lmcompress-upload-"))
    try:
        limits = _Limits(max_entries, max_total_bytes)
        archive, members, open_member = _open(Path(path), limits)
        with archive:
            _extract(members, open_member, dest, limits)
        return _model_root(dest)
    except (ArchiveError, zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveError(f"archive rejected: corrupt or unreadable ({exc})") from None
