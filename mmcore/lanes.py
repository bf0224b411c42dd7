"""Lanes for many users: how much of each kind of work runs at once, and short work first.

Long work (generation, batch files, gallery embedding, training) and short work (fill-mask,
next sentence, zero-shot, a search, attention maps) share the machine. The app gives each
kind its own concurrency group (`lane_sizes`), and short work marks itself with
`PRIORITY.short()`: long loops call `PRIORITY.wait_turn()` between their steps and wait
while any short work runs, so a short request waits at most one step of a long one.
"""

import contextlib
import ctypes
import functools
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


# ------------------------------------------------------------------ OpenMP thread pools

OMP_PAUSE_HARD = 2                   # omp_pause_resource_t (OpenMP 5.0)


@functools.lru_cache(maxsize=1)
def _omp_pause():
    """(omp_pause_resource, the host's device number) of the GNU OpenMP runtime torch runs
    on (libgomp, loaded by torch), or None: another runtime, or none found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if len(line.split()) >= 6}
        gomp = sorted(p for p in paths if os.path.basename(p).startswith("libgomp"))
        home = os.path.dirname(os.path.dirname(os.path.realpath(torch.__file__)))
        # torch's own (torch/lib, torch.libs/) where another library brought the system's too
        path = next((p for p in gomp if p.startswith(os.path.join(home, "torch"))), gomp[0])
        lib = ctypes.CDLL(path)                 # the loaded one: dlopen gives its handle
        pause = lib.omp_pause_resource
        pause.argtypes, pause.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        device = int(lib.omp_get_initial_device())     # -2 in torch 2.14's libgomp
        if pause(OMP_PAUSE_HARD, device) != 0:          # it must work here, once
            return None
        return pause, device
    except Exception:  # noqa: BLE001 - no /proc, no libgomp, an old one: nothing to release
        return None


def can_release_threads() -> bool:
    """Whether `release_threads` works here (torch on GNU OpenMP, as its Linux wheels)."""
    return _omp_pause() is not None


def let_go() -> None:
    """`release_threads`, unless this is the main thread of a process that runs no
    scheduler (plain Python use: its pool troubles nobody, and keeping it saves starting
    one per call, which costs more on a CPU of many cores)."""
    if PRIORITY.decoders or threading.current_thread() is not threading.main_thread():
        release_threads()


def release_threads() -> None:
    """Let go of this thread's OpenMP worker threads. GNU OpenMP keeps a pool of workers
    for every thread that ever ran a parallel region (the main thread's load, each server
    thread a short request ran on), and once the process holds more such workers than the
    machine has cores, every pool stops spinning between regions and sleeps: each of a
    decode step's ~300 parallel regions then pays futex wake-ups. Measured on 2 cores
    (SmolLM2 Q4, a decode step in a thread other than the main one): 2 threads 41.6 ms
    against 26.2 on 1 while the main thread held its pool; 19.5 once it let go (batch 8:
    68.9 / 58.6 -> 37.3). The next parallel region in this thread starts a new pool: 0.13
    ms for both, measured."""
    found = _omp_pause()
    if found is not None:
        pause, device = found
        pause(OMP_PAUSE_HARD, device)


class Priority:
    """Short requests first. Long loops either pause between their steps while short work
    runs (`wait_turn`), or, when they leave CPU cores free, keep running: a CPU loop that
    `reserve`s its threads (the scheduler: one on a small CPU) leaves short work the other
    cores, and short work then runs on those alone (`short()` lowers its thread's torch
    threads to them), so neither waits for the other."""

    def __init__(self):
        self._running = 0
        self._long = 0                # long work running (training, batch embedding)
        self.decoders = 0             # scheduler threads running (serving.Scheduler)
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

    @contextlib.contextmanager
    def long(self):
        """Mark a block as long work (a training run, embedding a gallery): a scheduler
        decodes on its kept threads meanwhile, not on every core (`quiet`)."""
        with self._cond:
            self._long += 1
        try:
            yield
        finally:
            with self._cond:
                self._long -= 1

    @contextlib.contextmanager
    def decoding(self):
        """Mark a scheduler thread's life (`decoders`): while one runs, every thread lets go
        of its OpenMP workers after multi-threaded work (`let_go`)."""
        with self._cond:
            self.decoders += 1
        try:
            yield
        finally:
            with self._cond:
                self.decoders -= 1

    def quiet(self) -> bool:
        """Neither short nor long work runs now: a scheduler may take every core."""
        return self._running == 0 and self._long == 0

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
    count. A block on more than one thread then lets go of its OpenMP workers (`let_go`:
    0.13 ms with starting them again, measured on 2 cores)."""
    n = n or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != default_threads():
            torch.set_num_threads(default_threads())
        if n > 1:
            let_go()                # an idle pool slows every other thread's (~0.1 ms)


@contextlib.contextmanager
def long_work(n: int | None = None):
    """A block of long work on `n` torch threads (`threads`), marked as long work."""
    with PRIORITY.long(), threads(n):
        yield


PRIORITY = Priority()       # one per process: the cores (or GPU) are shared by every thread
