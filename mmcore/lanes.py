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
            spare = cpu_cores() - self.reserved if self.reserved else 0
        before = torch.get_num_threads()
        if spare and spare < before:
            torch.set_num_threads(max(1, spare))      # this thread's team: the free cores
        try:
            yield
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)
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


PRIORITY = Priority()       # one per process: the cores (or GPU) are shared by every thread
