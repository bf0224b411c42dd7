"""Safe extraction of users' .zip uploads into a folder the caller owns.

Every limit is checked from the archive's directory before anything is written: entry
count, total and per-file uncompressed size (and the caller's disk budget), compression
ratio (zip bombs), absolute or `..` names and symlinks (zip-slip), encrypted entries,
overlapping entries, names too long or too deep for a file system. `__MACOSX/`, hidden files
and folders are skipped. A bad entry (damaged data, a name that is both a file and a folder)
is skipped with its reason; only a bad archive as a whole is an error. Messages name entries,
never server paths.
"""

import os
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .errors import InputError

MAX_ENTRIES = 5000
MAX_TOTAL = 1024 * 1024 * 1024          # 1 GiB uncompressed
MAX_FILE = 100 * 1024 * 1024
MAX_RATIO = 100                          # uncompressed / compressed, per entry
MAX_NAME = 255                           # bytes per path part (most file systems)
MAX_DEPTH = 32                           # folders inside the archive
MAX_PATH = 1024                          # characters of the whole entry name


def _skipped(parts: tuple) -> bool:
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def _shown(name: str) -> str:
    """An entry name short enough to show in a message."""
    return name if len(name) <= 80 else name[:40] + "…" + name[-20:]


def _unsafe(name: str, parts: tuple):
    """Why an entry name cannot be extracted, or None."""
    if not parts:
        return "empty name"
    if PurePosixPath(name).is_absolute() or ".." in parts or ":" in parts[0]:
        return "unsafe path"
    if len(parts) > MAX_DEPTH + 1:
        return f"more than {MAX_DEPTH} folders deep"
    if len(name) > MAX_PATH or any(len(p.encode("utf-8", "replace")) > MAX_NAME for p in parts):
        return "name too long"
    return None


def safe_extract(archive, suffixes=None, dest=None, budget: int | None = None) -> tuple:
    """(folder, files, skipped): the files extracted into `dest` (default: a new temp
    folder), and [(name, reason)] for entries left out. Raises InputError if the archive as a
    whole is bad or would unpack to more than `budget` bytes (the caller's disk quota).
    `suffixes`: keep only names ending so (lower case), e.g. (".jpg", ".png", ".csv")."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise InputError("Not a readable .zip file.") from None
    with zf:
        # not ZipInfo.is_dir(): it fails on an entry with an empty name
        infos = [i for i in zf.infolist() if not i.filename.endswith("/")]
        if len(infos) > MAX_ENTRIES:
            raise InputError(f"The archive has {len(infos):,} files; the limit is {MAX_ENTRIES:,}.")
        total = sum(i.file_size for i in infos)
        if total > MAX_TOTAL:
            raise InputError(f"The archive unpacks to {total:,} bytes; the limit is {MAX_TOTAL:,}.")
        if budget is not None and total > budget:
            raise InputError(f"The archive unpacks to {total:,} bytes, more than the "
                             f"{max(0, budget):,} bytes of disk left to your session.")
        spans = sorted((i.header_offset, i.header_offset + i.compress_size) for i in infos)
        if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
            raise InputError("The archive has overlapping entries (a zip bomb pattern).")
        folder = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="mmcore-zip-"))
        folder.mkdir(parents=True, exist_ok=True)
        root = folder.resolve()
        files, skipped = [], []
        left = min(total, budget if budget is not None else total)   # bytes we may write
        for info in infos:
            name = info.filename
            parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
            reason = _unsafe(name, parts)
            if reason is None and _skipped(parts):
                continue
            mode = info.external_attr >> 16
            if reason is None and stat.S_ISLNK(mode):
                reason = "symbolic link"
            elif reason is None and info.flag_bits & 0x1:
                reason = "encrypted"
            elif reason is None and suffixes and not name.lower().endswith(tuple(suffixes)):
                reason = "not a supported file type"
            elif reason is None and info.file_size > MAX_FILE:
                reason = f"{info.file_size:,} bytes; the limit is {MAX_FILE:,}"
            elif reason is None and info.compress_size and \
                    info.file_size / info.compress_size > MAX_RATIO:
                reason = "compression ratio too high (zip bomb?)"
            if reason is not None:
                skipped.append((_shown(name), reason))
                continue
            target = folder.joinpath(*parts)
            try:
                if root not in target.resolve().parents:
                    skipped.append((_shown(name), "unsafe path"))
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                written = _copy(zf, info, target, min(MAX_FILE, left))
            except (zipfile.BadZipFile, zlib.error, EOFError, InputError, RuntimeError,
                    ValueError, OSError) as exc:
                _discard(target)
                skipped.append((_shown(name), _why(exc)))
                continue
            left -= written
            files.append(target)
        return folder, files, skipped


def _copy(zf, info, target: Path, limit: int) -> int:
    """Stream one entry to `target`, never past `limit` bytes (headers can lie)."""
    written = 0
    with zf.open(info) as src, open(target, "xb") as dst:       # "x": never overwrite
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise InputError("larger than declared")
            dst.write(chunk)
    return written


def _discard(target: Path) -> None:
    try:
        if target.is_file() and not target.is_symlink():
            target.unlink()
    except OSError:
        pass


def _why(exc: BaseException) -> str:
    """A reason without server paths (OSError's text names the file)."""
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, FileExistsError)):
        return "a file and a folder share this name"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot be written ({exc.strerror.lower()})"
    if isinstance(exc, (zlib.error, zipfile.BadZipFile, EOFError)):
        return "damaged data"
    if isinstance(exc, InputError):
        return str(exc)
    return f"unreadable ({type(exc).__name__})"


def size_of(folder) -> int:
    """Bytes of the files under `folder` (what a quota counts)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total
