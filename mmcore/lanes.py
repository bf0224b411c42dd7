"""Lanes for many users: how much of each kind of work runs at once, and short work first.

Long work (generation, batch files, gallery embedding, training) and short work (fill-mask,
next sentence, zero-shot, a search, attention maps) share the machine. The app gives each
kind its own concurrency group (`lane_sizes`), and short work marks itself with
`PRIORITY.short()`: long loops call `PRIORITY.wait_turn()` between their steps and wait
while any short work runs, so a short request waits at most one step of a long one.
"""

import contextlib
import os
import threading

import torch


def default_max_batch(device) -> int:
    """Streams per decode step: a GPU has room for many; on a CPU a step's cost starts to
    grow with the batch past about 16 rows of a small model."""
    return 32 if torch.device(device).type == "cuda" else 16


def lane_sizes(device, max_batch: int) -> dict:
    """How many requests each lane runs at once, sized to the machine: generation admits a
    full batch; short work gets about one slot per two cores (each torch call already uses
    several) or a few on a GPU; long work (batch files, gallery embedding) one or two."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    gpu = torch.device(device).type == "cuda"
    return {"generate": int(max_batch), "short": 4 if gpu else max(1, min(4, cores // 2)),
            "long": 2 if gpu else 1}


class Priority:
    """Short requests first: while one runs, long loops wait between their steps."""

    def __init__(self):
        self._running = 0
        self.waiting = 0              # long loops parked now
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def short(self):
        with self._cond:
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def wait_turn(self, timeout: float = 1.0, give_up=lambda: False) -> None:
        """Return when no short work runs, or after `timeout` (so long work never starves),
        or once `give_up()` is true (checked whenever `wake()` is called)."""
        with self._cond:
            if self._running:
                self.waiting += 1
                try:
                    self._cond.wait_for(lambda: self._running == 0 or give_up(), timeout)
                finally:
                    self.waiting -= 1

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


PRIORITY = Priority()       # one per process: the cores (or GPU) are shared by every thread
