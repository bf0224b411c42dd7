"""What every tab is handed: the kit, the app's limits, and the handler guard.

No models or per-user data live at module level: a tab gets an `AppContext` in `build(ctx)`
and keeps per-user data in `gr.State`.
"""

import atexit
import contextlib
import functools
import html
import inspect
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from mmcore import Kit, MmcoreError
from mmcore.datadir import DataDir, digest

from .files import SessionFiles

log = logging.getLogger("mmcore.app")

MODEL_GROUP = "model"   # one concurrency group for every event that runs a model
MB = 2**20
MARKDOWN_MARKS = set("\\`*_[]#|~!")
LANES = ("generate", "short", "long")   # concurrency groups when serving many users


@dataclass
class AppContext:
    kit: Kit
    queue_size: int = 64             # waiting requests beyond this get "queue is full"
    model_concurrency: int = 1       # model events run at once (torch already uses every core)
    # lane -> events run at once; empty: one shared slot (model_concurrency) as before
    lanes: dict = field(default_factory=dict)
    max_file_size: str = "50mb"      # per uploaded file
    max_uploads: int = 64            # files per request
    gallery_dir: str | None = None   # a server folder the retrieval tab may index (operator flag)
    data_dir: str | None = None      # fine-tuned models and runs (None: mmcore's default)
    max_extra_kits: int = 2          # fine-tuned models kept loaded at once (LRU)
    session_disk_mb: int = 512       # temp files per user session
    total_disk_mb: int = 8192        # temp files of all sessions together, uploads included
    data_disk_mb: int = 10240        # the data dir (fine-tuned models, runs); 0: no limit
    cache_ttl: int = 3600            # seconds Gradio keeps uploads and outputs (delete_cache)
    admin_token: str = ""            # lets the operator stop anyone's training job
    # models users may load into a role at run time (mmcore.model_pool): the operator's
    # --models list, --allow-model-loading (any hub id), and the memory they may take
    allowed_models: dict = field(default_factory=dict)
    allow_model_loading: bool = False
    extra_model_mb: int = 4096
    _pool: object = field(default=None, repr=False)
    _warmer: threading.Thread | None = field(default=None, repr=False)
    page_load: list = field(default_factory=list, repr=False)   # (fn, outputs) per page open
    # fine-tuned dual encoders on this server: {name: checkpoint folder}
    checkpoints: dict = field(default_factory=dict)
    streams: "Streams" = field(default_factory=lambda: Streams(), repr=False)  # generations now
    training: object = field(default=None, repr=False)    # the training tab's job
    _work_dir: Path | None = field(default=None, repr=False)
    _housekeeper: threading.Thread | None = field(default=None, repr=False)
    _extra: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _extra_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        from gradio.utils import get_upload_folder

        self.data = DataDir(self.data_dir)
        removed = self.data.prepare()
        if removed:
            log.info("removed %d half-written folder(s) from the data dir", len(removed))
        self.checkpoints.update(self.data.finished_models())
        # one folder per app instance: two apps sharing GRADIO_TEMP_DIR never touch each
        # other's sessions (app.py gives each start a fresh GRADIO_TEMP_DIR anyway)
        self.files = SessionFiles(Path(get_upload_folder()) / f"mmcore-{uuid.uuid4().hex[:8]}",
                                  self.session_disk_mb * MB, self.total_disk_mb * MB)
        # its sessions end with the process (an operator's GRADIO_TEMP_DIR outlives it)
        atexit.register(shutil.rmtree, self.files.root, True)

    @property
    def session_disk_bytes(self) -> int:
        return self.files.session_bytes

    @session_disk_bytes.setter
    def session_disk_bytes(self, value: int) -> None:
        self.files.session_bytes = int(value)

    @property
    def work_dir(self) -> Path:
        """A folder of app-wide files made once (demo photos, the demo training set). It
        lies outside Gradio's folder: a client can make Gradio delete any file there by
        naming it in a payload, and these are read by the server only (an output made from
        one is copied into Gradio's cache)."""
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="mmcore-app-"))
            atexit.register(shutil.rmtree, self._work_dir, True)
        return self._work_dir

    def on_page_load(self, fn, outputs) -> None:
        """Run `fn` into `outputs` whenever a page opens (registered by `build_app`)."""
        self.page_load.append((fn, outputs))

    def model_event(self, lane: str = "short") -> dict:
        """Keyword arguments that put an event in its lane's concurrency group: "generate"
        (streams batched together), "short" (a click answered in a moment) or "long"
        (batch CSVs, gallery embedding). Without lanes every model event shares one slot."""
        if lane not in LANES:
            raise ValueError(f"unknown lane {lane!r}")
        if not self.lanes:
            return {"concurrency_id": MODEL_GROUP, "concurrency_limit": self.model_concurrency}
        return {"concurrency_id": lane, "concurrency_limit": self.lanes[lane]}

    def start_housekeeping(self, every: float = 30.0) -> None:
        """A background thread that removes idle sessions' files and hands freed memory
        back to the OS, every `every` seconds."""
        from mmcore import memory

        def loop():
            while True:
                time.sleep(every)
                try:
                    self.files.sweep()
                    memory.trim()
                except Exception:  # noqa: BLE001 - housekeeping must never stop
                    log.exception("housekeeping failed")

        if self._housekeeper is None:
            self._housekeeper = threading.Thread(target=loop, name="mmcore-housekeeping",
                                                 daemon=True)
            self._housekeeper.start()

    def start_warming(self) -> None:
        """Load every role in a background thread; the header shows progress and errors."""
        if self._warmer is None:
            self._warmer = threading.Thread(target=self.kit.warm, name="mmcore-warm", daemon=True)
            self._warmer.start()

    @property
    def pool(self):
        """Models loaded into a role at run time (the Models tab), made on first use."""
        if self._pool is None:
            from mmcore.model_pool import ModelPool

            self._pool = ModelPool(self.kit, self.allowed_models, self.allow_model_loading,
                                   self.extra_model_mb)
        return self._pool

    def loaded_choices(self, role: str) -> list:
        """Run-time loaded models ready for `role`, as the tabs' model menus name them (a
        listed folder by its name only)."""
        return [f"loaded: {name}" for name in self._loaded(role)]

    def _loaded(self, role: str) -> dict:
        from mmcore.dual_encoder import public_name

        pool = self.pool
        return {public_name(s): s for s in pool.choices(role) if pool.status(role, s) == "ready"}

    def encoder_choices(self) -> list:
        return ["base model"] + list(self.checkpoints) + self.loaded_choices("dual_encoder")

    def role_kit(self, role: str, choice: str | None):
        """The kit whose `role` is `choice`: the base model, or one loaded at run time
        ("loaded: SOURCE"); fine-tuned dual encoders go through `kit_for`."""
        if isinstance(choice, str) and choice.startswith("loaded: "):
            return self._loaded_kit(role, choice)
        if role == "dual_encoder":
            return self.kit_for(choice)
        if not choice or choice == "base model":
            return self.kit
        from mmcore import InputError

        raise InputError(f"No model named {str(choice)[:80]!r} for {role} on this server.")

    def _loaded_kit(self, role: str, choice: str):
        source = self._loaded(role).get(choice[len("loaded: "):])
        if source is None:
            from mmcore import InputError

            raise InputError(f"{choice[:80]!r} is not loaded (any more); load it on the Models "
                             "tab.")
        return self.pool.kit(role, source)

    def kit_for(self, choice: str | None):
        """The kit whose dual encoder is `choice` (the base, or a fine-tuned checkpoint).
        At most `max_extra_kits` fine-tuned ones stay loaded; the least recently used goes."""
        if not choice or choice == "base model":
            return self.kit
        if isinstance(choice, str) and choice.startswith("loaded: "):
            return self._loaded_kit("dual_encoder", choice)
        if not isinstance(choice, str) or choice not in self.checkpoints:
            from mmcore import InputError

            raise InputError(f"No fine-tuned model named {str(choice)[:80]!r} on this server.")
        import mmcore
        from mmcore import kits

        with self._extra_lock:
            if choice in self._extra:
                self._extra.move_to_end(choice)
                return self._extra[choice]
            kit = mmcore.load_kit(self.kit.name, dual_encoder=self.checkpoints[choice],
                                  precision=self.kit.precision)
            self._extra[choice] = kit
            while len(self._extra) > max(1, int(self.max_extra_kits)):
                _, old = self._extra.popitem(last=False)
                kits.release(old, keep=self.kit)
            return kit

    def data_left(self) -> int:
        """Bytes the data dir may still grow by (`data_disk_mb`); it holds what users made
        to keep (fine-tuned models outlive restarts), so no model is pruned: past the quota
        the training start drops cut-short runs' data (`DataDir.free_cut_short`), then
        refuses."""
        from mmcore.archives import size_of

        if self.data_disk_mb <= 0:
            return 2**62
        return self.data_disk_mb * MB - (size_of(self.data.root) if self.data.root.is_dir()
                                         else 0)

    def resumable(self, request=None) -> list:
        """Training runs that were cut short and the session of `request` may resume (see
        `DataDir.may_resume`), except the one running now."""
        job = self.training
        active = job.name if job is not None and job.running else None
        return [name for name in self.data.resumable(session_owner(request))
                if name != active]

    def forget_kit(self, choice: str) -> None:
        """Drop a loaded fine-tuned kit (its checkpoint changed on disk)."""
        from mmcore import kits

        with self._extra_lock:
            old = self._extra.pop(choice, None)
        if old is not None:
            kits.release(old, keep=self.kit)

    def memory(self) -> dict:
        """The process's resident memory and the fine-tuned models loaded beside the kit."""
        from mmcore import kits, memory

        with self._extra_lock:
            extra = list(self._extra.items())
        return {"rss_mb": round(memory.rss_bytes() / MB, 1),
                "extra_models": {"limit": max(1, int(self.max_extra_kits)),
                                 "loaded": [{"name": name, "mb": round(
                                     kits.loaded_bytes(kit, self.kit) / MB, 1)}
                                     for name, kit in extra]}}

    @property
    def warming(self) -> bool:
        return self._warmer is not None and self._warmer.is_alive()


def session_owner(request) -> str | None:
    """A digest of the session behind `request` (what a training run records as its
    owner; the session hash itself never goes to disk), or None without one."""
    key = getattr(request, "session_hash", None)
    return digest(str(key)) if key else None


def text_md(text) -> str:
    """User text placed in Markdown, shown as text: no HTML, no Markdown markup."""
    escaped = html.escape(str(text))
    return "".join("\\" + c if c in MARKDOWN_MARKS else c for c in escaped)


def user_error(message: str) -> gr.Error:
    """A gr.Error whose text is safe as HTML (Gradio renders error text as HTML) and stays
    plain text for API clients wherever it can: only <, > and & are escaped, so quotes in
    messages (model's, not 'abc') reach gradio_client as they were written."""
    return gr.Error(html.escape(message, quote=False), print_exception=False)


def server_roots() -> list:
    """Folders whose paths a message to a client must not show (longest first)."""
    from gradio.utils import get_upload_folder

    from mmcore import cache

    roots = {get_upload_folder(), str(cache.cache_root()), os.getcwd(), tempfile.gettempdir(),
             os.path.expanduser("~"), os.environ.get("MMCORE_DATA_DIR", "")}
    roots |= {os.path.realpath(r) for r in roots if r}
    return sorted((r.rstrip("/") for r in roots if len(r.rstrip("/")) > 1), key=len,
                  reverse=True)


def scrub(message: str) -> str:
    """The message with every server path cut to its last part (a safety net: mmcore's
    messages name files by their user-facing names, but a model folder may slip through)."""
    for root in server_roots():
        message = re.sub(re.escape(root) + r"(/[^\s'\"]*)?",
                         lambda m: (m.group(1) or "/").rstrip("/").rsplit("/", 1)[-1] or "…",
                         message)
    return message


def _translate(exc: BaseException) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, MmcoreError):
        return user_error(scrub(str(exc)))
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return user_error("The GPU ran out of memory. Try a smaller input or batch.")
    log.exception("unexpected error in a handler")
    return user_error(f"Internal error ({type(exc).__name__}); it has been logged on the server.")


def guarded(fn):
    """Turn any exception into a clear, escaped message; the server keeps serving. The
    server thread that ran the handler (or a streamed handler's step: Gradio may run each
    on another thread) then lets go of any OpenMP workers its model work started
    (`lanes.release_threads`): idle pools in server threads would make the scheduler's
    sleep between its parallel regions."""
    from mmcore.lanes import release_threads

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            steps = fn(*args, **kwargs)
            try:
                for update in steps:
                    release_threads()
                    yield update
            except Exception as exc:  # noqa: BLE001 - the guard is the point
                raise _translate(exc) from None
            finally:
                steps.close()           # a closed stream closes the handler at once
                release_threads()
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise _translate(exc) from None
        finally:
            release_threads()
    return wrapper


class Pacer:
    """Paces a streamed handler's updates: `due()` is True at most every `every` seconds
    (and at the first call). A handler that yields on every token makes Gradio postprocess,
    diff and send an update per token; on a small CPU that Python work holds the GIL the
    decoding thread needs between its ops, so with eight streams it cost ~40% of the
    batch's tokens/s (bench/bench_serving.py)."""

    def __init__(self, every: float, interval: "Callable[[], float] | None" = None):
        self.every, self.last = every, None
        self.interval = interval          # seconds now, asked at each check (else `every`)

    def wait(self) -> float:
        """Seconds until the next update is due (0: due now): how long a paced stream's
        handler may sleep (`Kit.generate_tokens(pace=...)`)."""
        if self.last is None:
            return 0.0
        return self.last + self._every() - time.perf_counter()

    def due(self, now: float | None = None) -> bool:
        now = time.perf_counter() if now is None else now
        if self.last is not None and now - self.last < self._every():
            return False
        self.last = now
        return True

    def _every(self) -> float:
        return self.interval() if self.interval is not None else self.every


class Streams:
    """The streamed generations this server is running, so that each paces its updates by
    how many share the machine: together they send about `budget` text updates a second
    (bench_serving, 8 users on 2 cores: a text update per stream every 0.1 s, 72 tok/s;
    every 0.4 s, 75-82 tok/s). A stream counts from its first token (not while it waits for
    a batch slot). Chat's Stop cancels its event, which Gradio carries out at the handler's
    next update: with many streams running, up to their interval later."""

    def __init__(self, budget: float = 20.0):
        self.budget, self.count = budget, 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def running(self):
        with self._lock:
            self.count += 1
        try:
            yield
        finally:
            with self._lock:
                self.count -= 1

    def interval(self, least: float, most: float) -> float:
        """Seconds between one stream's updates now: `least` when few run, up to `most`."""
        return min(most, max(least, self.count / self.budget))
