"""Unpack an uploaded model archive (.zip, .tar, .tar.gz/.tgz) safely into a fresh temporary folder.

Uploaded archives are untrusted. Every member is checked before anything is written, and any bad
member rejects the whole archive: absolute paths, `..` components, drive letters, symlinks and
hardlinks, device files, too many entries, or a total uncompressed size over the cap (zip bombs).
Extraction then copies member bytes by hand into the temp folder with a running byte count, so even
a lying header cannot write more than the cap. The caller loads the folder with models.load_model.
"""
from __future__ import annotations

import shutil
import tarfile
import tempfile
import zipfile
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
        members.append(_Member(info.filename, info.file_size, info.is_dir(), not info.is_dir()))
    return members


def _tar_members(archive: tarfile.TarFile) -> list[_Member]:
    """Tar entries as _Member; links, devices and fifos reject the archive."""
    members = []
    for info in archive.getmembers():
        if info.issym() or info.islnk():
            raise ArchiveError(f"archive rejected: {info.name!r} is a link")
        if not (info.isfile() or info.isdir()):
            raise ArchiveError(f"archive rejected: {info.name!r} is a device, fifo or other special file")
        members.append(_Member(info.name, info.size, info.isdir(), info.isfile()))
    return members


def check_members(members: list[_Member], max_entries: int = MAX_ENTRIES,
                  max_total_bytes: int = MAX_TOTAL_BYTES) -> None:
    """All-or-nothing checks on the declared entries: count, paths and total size."""
    if len(members) > max_entries:
        raise ArchiveError(f"archive rejected: {len(members)} entries, at most {max_entries} allowed")
    total = 0
    for member in members:
        _safe_relative(member.name)
        total += max(member.size, 0)
    if total > max_total_bytes:
        raise ArchiveError(f"archive rejected: {total:,} bytes uncompressed, at most {max_total_bytes:,} allowed")


def _copy_capped(source: BinaryIO, target: Path, budget: list[int]) -> None:
    """Copy bytes while charging them to the shared budget; a lying size header still stops at the cap."""
    with open(target, "xb") as out:
        while chunk := source.read(CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise ArchiveError("archive rejected: uncompressed data exceeds the size cap")
            out.write(chunk)


def _open(path: Path):
    """(archive object, member list, opener of member bytes) for a zip or tar file."""
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        return archive, _zip_members(archive), lambda m: archive.open(m.name)
    try:
        archive = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError):
        # tarfile's own message lists each compression it tried ("method gz: ReadError(...) - method bz2 ..."):
        # a person needs to know what the file should be, not which decoders failed
        raise ArchiveError("not a model archive: the file is neither a .zip nor a .tar / .tar.gz / .tar.bz2 / "
                           ".tar.xz archive") from None
    return archive, _tar_members(archive), lambda m: archive.extractfile(m.name)


def _model_root(folder: Path) -> Path:
    """The folder holding config.json: the archive root, or its single top-level folder."""
    if (folder / "config.json").is_file():
        return folder
    children = [p for p in folder.iterdir()]
    if len(children) == 1 and children[0].is_dir() and (children[0] / "config.json").is_file():
        return children[0]
    raise ArchiveError("archive rejected: no config.json at its root or in a single top-level folder")


def extract_model_archive(path: str | Path, max_entries: int = MAX_ENTRIES,
                          max_total_bytes: int = MAX_TOTAL_BYTES) -> Path:
    """Check then extract `path` into a new temporary folder; return the folder holding config.json.

    On any rejection nothing is left behind (the temp folder is removed) and ArchiveError is raised.
    On success the caller owns the temp folder (remove it with shutil.rmtree when done).
    """
    archive, members, open_member = _open(Path(path))
    dest = Path(tempfile.mkdtemp(prefix="lmcompress-upload-"))
    try:
        with archive:
            check_members(members, max_entries, max_total_bytes)
            budget = [max_total_bytes]
            for member in members:
                target = dest.joinpath(*_safe_relative(member.name).parts)
                if member.is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with open_member(member) as source:
                    _copy_capped(source, target, budget)
        return _model_root(dest)
    except (ArchiveError, zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveError(f"archive rejected: corrupt or unreadable ({exc})") from None
