"""Micro-batching for short work: requests that arrive together run as one batch.

    batcher = MicroBatcher(encode, max_batch=32, max_wait=0.002)
    vectors = batcher(items)        # from any thread; the result for these items only

`encode(items) -> (N, ...)` (a tensor or a list) must treat each item independently (an
encoder in eval mode: no batch statistics), so results split back per request equal
unbatched ones up to floating-point summation order. No thread of its own: the first
caller of a batch runs it. A lone request runs at once; while a batch runs, callers that
arrive gather into the next one (waiting at most `max_wait` more for company), so under
load many requests share one forward and when idle nothing waits.

If a batch fails, its requests run one by one, so one bad request fails alone.
"""

import threading


class _Batch:
    def __init__(self):
        self.parts: list = []           # one list of items per request
        self.results: list = []         # per request: its result or its exception
        self.full = threading.Event()
        self.done = threading.Event()

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)


class MicroBatcher:
    def __init__(self, fn, max_batch: int = 32, max_wait: float = 0.002):
        self.fn, self.max_batch, self.max_wait = fn, int(max_batch), float(max_wait)
        self._lock = threading.Lock()
        self._run = threading.Lock()    # one batch runs at a time
        self._open: _Batch | None = None
        self.batches = 0                # batches run (stats and tests)
        self.peak = 0                   # the most requests one batch served

    def __call__(self, items):
        items = list(items)
        if not items:
            return self.fn(items)
        if len(items) >= self.max_batch:
            return self.fn(items)       # already a batch of its own
        with self._lock:
            batch, leader = self._open, False
            if batch is None or batch.size + len(items) > self.max_batch:
                batch, leader = _Batch(), True
                self._open = batch
            index = len(batch.parts)
            batch.parts.append(items)
            if batch.size >= self.max_batch:
                self._open = None
                batch.full.set()
        if leader:
            busy = not self._run.acquire(blocking=False)
            if busy:                    # a batch runs now: company gathers meanwhile
                self._run.acquire()
            try:
                if busy and self.max_wait > 0:      # under load: a little more company
                    batch.full.wait(self.max_wait)
                with self._lock:
                    if self._open is batch:
                        self._open = None
                self._execute(batch)
            finally:
                self._run.release()
        else:
            batch.done.wait()
        result = batch.results[index]
        if isinstance(result, BaseException):
            raise result
        return result

    def _execute(self, batch: _Batch) -> None:
        self.batches += 1
        self.peak = max(self.peak, len(batch.parts))
        try:
            try:
                flat = [item for part in batch.parts for item in part]
                out = self.fn(flat)
                start = 0
                for part in batch.parts:
                    batch.results.append(out[start:start + len(part)])
                    start += len(part)
            except Exception:  # noqa: BLE001 - find whose request failed
                batch.results = []
                for part in batch.parts:
                    try:
                        batch.results.append(self.fn(part))
                    except Exception as exc:  # noqa: BLE001 - that request's own error
                        batch.results.append(exc)
        finally:
            while len(batch.results) < len(batch.parts):
                batch.results.append(RuntimeError("the batch did not run"))
            batch.done.set()
