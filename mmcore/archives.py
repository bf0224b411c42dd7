"""Safe extraction of users' .zip uploads into a fresh folder the app owns.

Every limit is checked from the archive's directory before anything is written: entry
count, total and per-file uncompressed size, compression ratio (zip bombs), absolute or
`..` names and symlinks (zip-slip), encrypted entries, overlapping entries. `__MACOSX/`,
hidden files and folders are skipped.
"""

import os
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from .errors import InputError

MAX_ENTRIES = 5000
MAX_TOTAL = 1024 * 1024 * 1024          # 1 GiB uncompressed
MAX_FILE = 100 * 1024 * 1024
MAX_RATIO = 100                          # uncompressed / compressed, per entry


def _skipped(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def safe_extract(archive, suffixes=None) -> tuple:
    """(folder, files, skipped): the files extracted to a new temp folder, and
    [(name, reason)] for entries left out. Raises InputError if the archive as a whole is bad.
    `suffixes`: keep only names ending so (lower case), e.g. (".jpg", ".png", ".csv")."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"Not a readable .zip file ({exc}).") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > MAX_ENTRIES:
            raise InputError(f"The archive has {len(infos):,} files; the limit is {MAX_ENTRIES:,}.")
        total = sum(i.file_size for i in infos)
        if total > MAX_TOTAL:
            raise InputError(f"The archive unpacks to {total:,} bytes; the limit is {MAX_TOTAL:,}.")
        spans = sorted((i.header_offset, i.header_offset + i.compress_size) for i in infos)
        if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
            raise InputError("The archive has overlapping entries (a zip bomb pattern).")
        folder = Path(tempfile.mkdtemp(prefix="mmcore-upload-",
                                       dir=os.environ.get("GRADIO_TEMP_DIR")))
        files, skipped = [], []
        for info in infos:
            name = info.filename
            path = PurePosixPath(name)
            mode = info.external_attr >> 16
            if path.is_absolute() or ".." in path.parts or ":" in path.parts[0]:
                skipped.append((name, "unsafe path"))
                continue
            if _skipped(name):
                continue
            if stat.S_ISLNK(mode):
                skipped.append((name, "symbolic link"))
                continue
            if info.flag_bits & 0x1:
                skipped.append((name, "encrypted"))
                continue
            if suffixes and not name.lower().endswith(tuple(suffixes)):
                skipped.append((name, "not a supported file type"))
                continue
            if info.file_size > MAX_FILE:
                skipped.append((name, f"{info.file_size:,} bytes; the limit is {MAX_FILE:,}"))
                continue
            if info.compress_size and info.file_size / info.compress_size > MAX_RATIO:
                skipped.append((name, "compression ratio too high (zip bomb?)"))
                continue
            target = folder.joinpath(*path.parts)
            if folder.resolve() not in target.resolve().parents:
                skipped.append((name, "unsafe path"))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as dst:
                    remaining = MAX_FILE + 1
                    while chunk := src.read(1 << 20):          # never trust the header alone
                        remaining -= len(chunk)
                        if remaining < 0:
                            raise InputError("entry larger than declared")
                        dst.write(chunk)
            except (zipfile.BadZipFile, OSError, InputError, RuntimeError) as exc:
                target.unlink(missing_ok=True)
                skipped.append((name, f"unreadable ({exc})"))
                continue
            files.append(target)
        return folder, files, skipped
