"""Compiled decode steps: one token of a causal LM through `torch.compile` on a static KV cache.

An eager decode step runs ~1,000 small ops (SmolLM2's 30 layers), each paying Python and
dispatch overhead that is larger than its arithmetic; inductor fuses the element-wise ones
(norms, rotary, residuals, SiLU) into a few C++ loops around the matmuls. It needs fixed
shapes, so the KV cache is transformers' `StaticCache` of a fixed length, and since every
step attends over the whole cache, lengths come in buckets (256, 512, 1024, 2048 positions:
measured on SmolLM2 Q4, a step over 1,024 positions took 20.6 ms against 13.3 over 256).

Compiling takes 10-60 s on two cores and holds the GIL most of that time (every other
thread of the process, eager decoding included, all but stops meanwhile), so it is opt-in
(MMCORE_COMPILE=1): the first request that needs a bucket starts its compile in a thread
and waits for it; requests for a bucket that failed to compile decode eagerly. The serving
scheduler uses it for a stream decoding alone (serving.py), without waiting for a compile.
Inductor's artefacts are cached on disk under $MMCORE_CACHE/inductor (a later start
compiles in ~10 s instead of ~60). It also needs a C++ compiler for inductor's CPU code. Measured on
SmolLM2 (bench_generate.py): at `exact` the compiled step gave the eager tokens (128 of
128; inductor may reorder fp32 sums, so a near-tie could flip a later token), at `fast`
1.45x the eager rate.
"""

import functools
import logging
import os
import shutil
import tempfile
import threading
import time
import types

import torch

log = logging.getLogger(__name__)

BUCKETS = (256, 512, 1024, 2048)
_one_at_a_time = threading.Lock()      # compiles are heavy: one at a time per process


def enabled() -> bool:
    """Whether compiled decoding is used (MMCORE_COMPILE=1, and inductor has a C++ compiler
    for its CPU code). Off by default: a compile holds the GIL for 10-60 s, and every other
    thread of the process (other users' decoding, the web server) waits meanwhile."""
    flag = os.environ.get("MMCORE_COMPILE", "").strip().lower()
    return flag in ("1", "true", "yes", "on") and _has_compiler()


@functools.lru_cache(maxsize=1)
def _has_compiler() -> bool:
    return bool(shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
                or shutil.which("clang++"))


def bucket(length: int) -> int | None:
    """The smallest cache length holding `length` positions, or None past the largest."""
    return next((b for b in BUCKETS if length <= b), None)


class CompiledDecode:
    """Compiled batch-1 decode steps of one causal LM, a compile per cache bucket made on
    first demand (in its own thread; the caller waits). `session(total)` gives a
    `StaticCache` and the step function once that bucket is ready, else None (decode
    eagerly, as before)."""

    def __init__(self, model):
        self.model = model
        self._fn = None                 # the compiled step (one function; a graph per bucket)
        self.state: dict = {}           # bucket -> "compiling" | "ready" | "failed: why"
        self.seconds: dict = {}         # bucket -> compile seconds
        self._lock = threading.Lock()
        self._limit = _context(model)

    def _step(self, token, position, cache):
        # transformers 5.24 takes positions from the cache itself; cache_position is passed
        # for versions that read it
        return self.model(input_ids=token, cache=cache, cache_position=position,
                          use_cache=True).logits[:, -1]

    @staticmethod
    def _guards(entries) -> list:
        """Which of dynamo's guards each step checks: the inputs (the cache's bucket) and
        globals, not the modules and tensors the model holds (~7,800 of SmolLM2's ~8,700;
        checking them cost ~1 ms a token: 95-99 -> 109-112 tok/s, measured). A served
        model is never changed in place after it loads; what tells two models apart is
        that each compiles its own code object (`_own_code`)."""
        return torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)

    def session(self, total: int, start: bool = True, wait: bool = True):
        """(StaticCache, step) for a sequence of `total` positions once its bucket is
        compiled, else None (decode eagerly). With `start` a bucket not tried yet begins
        compiling (in its own thread); with `wait` this call waits for that compile: eager
        decoding meanwhile would crawl anyway, as the compile holds the GIL."""
        size = bucket(total)
        if size is None or size > self._limit:
            return None
        with self._lock:
            if self.state.get(size) is None and start:
                self.state[size] = "compiling"
                threading.Thread(target=self._compile, args=(size,), daemon=True,
                                 name=f"mmcore-compile-{size}").start()
        if wait:
            self.wait(size)
        if self.state.get(size) != "ready":
            return None
        return self.new_cache(size), self._fn

    def new_cache(self, size: int):
        """An empty static cache of `size` positions (filled on its first update)."""
        from transformers import StaticCache

        with torch.inference_mode():    # as decoding runs: one kind of tensor, one graph
            return StaticCache(config=self.model.config, max_cache_len=size)

    def wait(self, size: int, timeout: float = 600) -> str:
        """Block until `size`'s compile ends (for tests and benchmarks); its state."""
        end = time.monotonic() + timeout
        while self.state.get(size) == "compiling" and time.monotonic() < end:
            time.sleep(0.05)
        return self.state.get(size, "")

    def _compile(self, size: int) -> None:
        with _one_at_a_time:
            self._compile_now(size)

    def _compile_now(self, size: int) -> None:
        from .lanes import default_threads

        start = time.perf_counter()
        try:
            _use_our_inductor_cache()
            torch.set_num_threads(default_threads())    # inductor writes it into its kernels
            import torch._dynamo as dynamo

            # one graph per bucket on this model's own code object (`_own_code`): past
            # the limit (dynamo's default is 8) a code object silently runs eager
            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
            with self._lock:
                if self._fn is None:
                    # fullgraph: frames dynamo would compile after a graph break are
                    # shared by every model of the class, and their module guards are
                    # left out too (`_guards`): a break fails the compile (eager goes on)
                    self._fn = torch.compile(_own_code(self._step), dynamic=False,
                                             fullgraph=True,
                                             options={"guard_filter_fn": self._guards})
            fn = self._fn
            device = next(self.model.parameters()).device
            cache = self.new_cache(size)
            with torch.inference_mode():             # as requests decode: no recompile then
                token = torch.zeros(1, 1, dtype=torch.long, device=device)
                self.model(input_ids=token, cache=cache, cache_position=torch.arange(
                    1, device=device), use_cache=True)
                for i in range(1, 3):            # compiles, then checks it runs as compiled
                    fn(token, torch.tensor([i], device=device), cache)
            state = "ready"
        except Exception as exc:  # noqa: BLE001 - eager decoding goes on; the reason is kept
            log.warning("compiling the decode step (cache %d) failed: %s", size, exc)
            state = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        with self._lock:
            self.state[size] = state
            self.seconds[size] = time.perf_counter() - start

    def describe(self) -> str:
        """For the Models tab: each cache bucket's compile, e.g. "compiled decode: 256
        positions ready (9 s), 512 compiling"."""
        parts = [f"{size} {state}" + (f" ({self.seconds[size]:.0f} s)" if size in self.seconds
                                      else "")
                 for size, state in sorted(self.state.items())]
        return "compiled decode: " + (", ".join(parts) if parts else "none yet")


def prefill(model, decode, seq: torch.Tensor, total: int, logits_to_keep: int,
            wait: bool = True) -> tuple:
    """(logits (T', V) of the last `logits_to_keep` positions, cache, step): one prefill of
    `seq` (1, T) on the static cache of `decode`'s bucket for `total` positions when that
    is compiled (step: the compiled step), else on a DynamicCache whose decode steps write
    in place (step None; `kv_cache.with_room`); on the model's two-pass int8 twin where it
    has one (`quantized_lm.prefill_twin`)."""
    from transformers import DynamicCache

    from .kv_cache import with_room
    from .quantized_lm import prefill_model

    session = decode.session(total, wait=wait) if decode is not None else None
    cache, step = session if session else (DynamicCache(config=model.config), None)
    where = {"cache_position": torch.arange(seq.shape[1], device=seq.device)} if step else {}
    logits = prefill_model(model)(input_ids=seq, cache=cache, use_cache=True,
                                  logits_to_keep=logits_to_keep, **where).logits[0]
    return logits, cache if step else with_room(cache), step


def _own_code(method):
    """`method` (a bound method) over a copy of its function's code object. Dynamo keeps
    compiled graphs per code object, picked by their guards; with the model's own guards
    left out (`CompiledDecode._guards`), two models of one class would share graphs."""
    func = method.__func__
    code = func.__code__.replace(co_name=f"{func.__name__}_{id(method.__self__):x}")
    return types.MethodType(types.FunctionType(code, func.__globals__, code.co_name,
                                               func.__defaults__, func.__closure__),
                            method.__self__)


def _context(model) -> int:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024)


def _use_our_inductor_cache() -> None:
    """Inductor's artefacts under $MMCORE_CACHE/inductor, unless the user chose a folder
    (inductor writes its default, /tmp/torchinductor_USER, into the variable itself)."""
    import getpass

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        default = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    except Exception:  # noqa: BLE001 - no user name: only an unset variable is ours to set
        default = None
    if current is None or current == default:
        from . import cache

        folder = cache.cache_root() / "inductor"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:                     # not writable: inductor's own folder then
            return
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
