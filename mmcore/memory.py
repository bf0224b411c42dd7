"""How much memory the process and its loaded models hold (shown on the Models tab)."""

import os

import torch


def rss_bytes() -> int:
    """Resident memory of this process (0 where it cannot be read)."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil missing or refused: fall back to /proc
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0


def tensors_of(obj):
    """Every parameter and buffer of the torch modules in `obj` (a module, a role object that
    holds one as `.model`, or a dict of them)."""
    items = obj.values() if isinstance(obj, dict) else [obj]
    for item in items:
        if isinstance(item, torch.nn.Module):
            yield from item.parameters()
            yield from item.buffers()
        elif hasattr(item, "__dict__"):                  # a role object wraps its modules
            for value in vars(item).values():
                if isinstance(value, torch.nn.Module):
                    yield from tensors_of(value)


def tensor_key(t: torch.Tensor) -> int:
    """What tells tensors apart for counting memory once: the data pointer (views and tied
    weights share it), or the object for oneDNN's opaque tensors, which have none."""
    return id(t) if t.is_mkldnn else t.data_ptr()


def own_bytes(obj, shared: set) -> int:
    """Bytes of the tensors in `obj` not in `shared` (`tensor_key`s of another model's
    tensors: a fork shares its frozen towers with the base model)."""
    seen, total = set(shared), 0
    for t in tensors_of(obj):
        ptr = tensor_key(t)
        if ptr not in seen:
            seen.add(ptr)
            total += t.element_size() * t.nelement()
    return total


def trim() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: a server that draws
    a plot or decodes an image per request shows a rising RSS that is not a leak)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass
