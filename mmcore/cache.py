"""The on-disk cache (`$MMCORE_CACHE`, default `~/.cache/mmcore`) and atomic folder writes."""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

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


@contextmanager
def atomic_folder(final: Path, key: str = ""):
    """Yield a temp folder beside `final`; on success mark it complete and rename it into place.

    An interrupted write leaves only a `.tmp-*` folder, never a half-written `final`.
    A stale or broken `final` is replaced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"key": key}))
        if final.exists():
            # rename the old one away first: os.replace cannot replace a non-empty folder
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            remove(old)
            os.replace(final, old)
            remove(old)
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
