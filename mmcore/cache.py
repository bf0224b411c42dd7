"""The on-disk cache (`$MMCORE_CACHE`, default `~/.cache/mmcore`) and atomic folder writes.

Every folder mmcore writes holds a marker file, `mmcore-complete.json`. Saving replaces only
folders that hold it (or are empty): a folder of someone's own files is refused unless the
caller passes `overwrite=True`.
"""

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

MARKER = "mmcore-complete.json"


def cache_root() -> Path:
    root = os.environ.get("MMCORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmcore")
    return Path(root)


def models_dir() -> Path:
    return cache_root() / "models"


def is_complete(folder: Path, key: str | None = None) -> bool:
    """True when `folder` was fully written by `atomic_folder` (with the same key, if given)."""
    try:
        meta = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return key is None or meta.get("key") == key


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def check_target(final, overwrite: bool = False) -> None:
    """Refuse to replace `final` unless it is absent, an empty folder or an mmcore folder
    (it holds the marker), or `overwrite` is set. The message names the folder, not its path."""
    final = Path(final)
    if overwrite or not (final.exists() or final.is_symlink()):
        return
    if final.is_dir() and not final.is_symlink():
        if (final / MARKER).is_file() or not any(final.iterdir()):
            return
        raise InputError(f"'{final.name}' already holds files that mmcore did not write (it has "
                         f"no {MARKER}); refusing to replace it. Choose another folder, or "
                         "pass overwrite=True (--overwrite) to replace it.")
    raise InputError(f"'{final.name}' exists and is not an mmcore folder; refusing to replace "
                     "it. Choose another name, or pass overwrite=True (--overwrite).")


def _fresh_folder(parent: Path, prefix: str) -> Path:
    """A new, empty folder: os.mkdir honours the umask (mkdtemp would make it 0700, and the
    saved folder would keep that)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        remove(path)
    else:
        path.unlink(missing_ok=True)       # a link goes, never what it points to


@contextmanager
def atomic_folder(final: Path, key: str = "", overwrite: bool = False):
    """Yield a temp folder beside `final`; on success mark it complete and rename it into place.

    An interrupted write leaves only a `.tmp-*` folder, never a half-written `final`.
    A previous mmcore folder (or an empty one) at `final` is replaced; anything else only
    with `overwrite=True` (checked before the work starts, and again before the rename).
    The new folder's permissions are what the user's umask gives.
    """
    final = Path(final)
    check_target(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_folder(final.parent, f".tmp-{final.name}-")
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"key": key}))
        check_target(final, overwrite)
        if final.exists() or final.is_symlink():
            # rename the old one away first: os.replace cannot replace a non-empty folder
            old = final.with_name(f".old-{final.name}-{secrets.token_hex(6)}")
            os.replace(final, old)
            _discard(old)
        os.replace(tmp, final)
    finally:
        remove(tmp)


def cached_tensor(name: str, key: str, compute):
    """A tensor computed once and kept as safetensors under the cache (atomic; a broken or
    stale file is recomputed)."""
    from safetensors.torch import load_file, save_file

    folder = models_dir() / name
    if is_complete(folder, key):
        try:
            return load_file(str(folder / "tensor.safetensors"))["value"]
        except Exception:  # noqa: BLE001 - any unreadable cache is rebuilt
            pass
    value = compute()
    with atomic_folder(folder, key) as tmp:
        save_file({"value": value.contiguous()}, str(tmp / "tensor.safetensors"))
    return value


def cached_tensors(name: str, key: str, compute) -> dict:
    """A dict of tensors computed once and kept as safetensors under the cache (atomic, and
    locked so two processes compute it once; a broken or stale file is recomputed)."""
    from filelock import FileLock
    from safetensors.torch import load_file, save_file

    folder = models_dir() / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if is_complete(folder, key):
            try:
                return load_file(str(folder / "tensors.safetensors"))
            except Exception:  # noqa: BLE001 - any unreadable cache is rebuilt
                pass
        value = compute()
        with atomic_folder(folder, key) as tmp:
            save_file({k: v.contiguous() for k, v in value.items()},
                      str(tmp / "tensors.safetensors"))
    return value
