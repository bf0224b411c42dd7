"""A least-recently-used cache bounded by bytes (label embeddings, per encoder)."""

import sys
import threading
from collections import OrderedDict

import torch


def nbytes(key, value) -> int:
    """What one entry holds: the key string and the tensor's storage."""
    size = sys.getsizeof(key)
    if isinstance(value, torch.Tensor):
        size += value.element_size() * value.nelement()
    return size


class BytesLRU:
    """dict-like; inserting past `max_bytes` evicts the least recently used entries."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key) -> bool:
        return key in self._data

    def get(self, key, default=None):
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key]

    def __setitem__(self, key, value) -> None:
        size = nbytes(key, value)
        with self._lock:
            if key in self._data:
                self.nbytes -= nbytes(key, self._data.pop(key))
            if size > self.max_bytes:
                return                            # larger than the whole cache: not kept
            self._data[key] = value
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                old, kept = self._data.popitem(last=False)
                self.nbytes -= nbytes(old, kept)

    def update(self, pairs) -> None:
        for key, value in pairs:
            self[key] = value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.nbytes = 0
