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
    cores = cpu_cores()
    gpu = torch.device(device).type == "cuda"
    return {"generate": int(max_batch), "short": 4 if gpu else max(1, min(4, cores // 2)),
            "long": 2 if gpu else 1}


_default_threads: list = []


def default_threads() -> int:
    """The process's torch thread count for model work, taken once, from the main thread
    where possible (the app asks at start). `torch.set_num_threads` in any thread also sets
    the count new threads start with, so work that needs a count sets it explicitly."""
    if not _default_threads:
        n = torch.get_num_threads()
        if threading.current_thread() is not threading.main_thread():
            n = max(n, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or cpu_cores())
        _default_threads.append(n)
    return _default_threads[0]


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)


class Priority:
    """Short requests first. Long loops either pause between their steps while short work
    runs (`wait_turn`), or, when they leave CPU cores free, keep running: a CPU loop that
    `reserve`s its threads (the scheduler: one on a small CPU) leaves short work the other
    cores, and short work then runs on those alone (`short()` lowers its thread's torch
    threads to them), so neither waits for the other."""

    def __init__(self):
        self._running = 0
        self.waiting = 0              # long loops parked now
        self.reserved = 0             # CPU threads long loops hold without pausing
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def short(self):
        with self._cond:
            self._running += 1
            # the cores a reserving loop leaves, or (none reserved) the process default
            want = max(1, cpu_cores() - self.reserved) if self.reserved else default_threads()
        with threads(want):
            try:
                yield
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

    def reserve(self, threads: int) -> None:
        """A CPU loop takes `threads` more threads (fewer when negative) on which it runs
        without pausing for short work; it gives them back when it has nothing to do, so
        short work on an idle machine gets every core."""
        with self._cond:
            self.reserved += threads

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


@contextlib.contextmanager
def threads(n: int | None = None):
    """Run a block on `n` torch threads in this thread (default: `default_threads()`), back
    to the default after: a pooled worker thread may have started with another thread's
    count."""
    n = n or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != default_threads():
            torch.set_num_threads(default_threads())


PRIORITY = Priority()       # one per process: the cores (or GPU) are shared by every thread
