"""What every tab is handed: the kit, the app's limits, and the handler guard.

No models or per-user data live at module level: a tab gets an `AppContext` in `build(ctx)`
and keeps per-user data in `gr.State`.
"""

import functools
import html
import inspect
import logging
import threading
from dataclasses import dataclass, field

import gradio as gr

from mmcore import Kit, MmcoreError

log = logging.getLogger("mmcore.app")

MODEL_GROUP = "model"   # one concurrency group for every event that runs a model


@dataclass
class AppContext:
    kit: Kit
    queue_size: int = 64             # waiting requests beyond this get "queue is full"
    model_concurrency: int = 1       # model events run at once (torch already uses every core)
    max_file_size: str = "50mb"      # per uploaded file
    gallery_dir: str | None = None   # a server folder the retrieval tab may index (operator flag)
    _warmer: threading.Thread | None = field(default=None, repr=False)
    page_load: list = field(default_factory=list, repr=False)   # (fn, outputs) per page open
    # fine-tuned dual encoders made on this server: {name: checkpoint folder}
    checkpoints: dict = field(default_factory=dict)

    def on_page_load(self, fn, outputs) -> None:
        """Run `fn` into `outputs` whenever a page opens (registered by `build_app`)."""
        self.page_load.append((fn, outputs))

    def model_event(self) -> dict:
        """Keyword arguments that put an event in the shared model concurrency group."""
        return {"concurrency_id": MODEL_GROUP, "concurrency_limit": self.model_concurrency}

    def start_warming(self) -> None:
        """Load every role in a background thread; the header shows progress and errors."""
        if self._warmer is None:
            self._warmer = threading.Thread(target=self.kit.warm, name="mmcore-warm", daemon=True)
            self._warmer.start()

    def encoder_choices(self) -> list:
        return ["base model"] + list(self.checkpoints)

    def kit_for(self, choice: str | None):
        """The kit whose dual encoder is `choice` (the base, or a fine-tuned checkpoint)."""
        if not choice or choice == "base model":
            return self.kit
        if choice not in self.checkpoints:
            from mmcore import InputError

            raise InputError(f"No fine-tuned model named {choice!r} on this server.")
        import mmcore

        return mmcore.load_kit(self.kit.name, dual_encoder=self.checkpoints[choice],
                               precision=self.kit.precision)

    @property
    def warming(self) -> bool:
        return self._warmer is not None and self._warmer.is_alive()


def user_error(message: str) -> gr.Error:
    """A gr.Error whose text is escaped: Gradio renders error text as HTML."""
    return gr.Error(html.escape(message), print_exception=False)


def _translate(exc: BaseException) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, MmcoreError):
        return user_error(str(exc))
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return user_error("The GPU ran out of memory. Try a smaller input or batch.")
    log.exception("unexpected error in a handler")
    return user_error(f"Internal error ({type(exc).__name__}); it has been logged on the server.")


def guarded(fn):
    """Turn any exception into a clear, escaped message; the server keeps serving."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the guard is the point
                raise _translate(exc) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise _translate(exc) from None
    return wrapper
