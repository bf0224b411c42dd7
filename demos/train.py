"""Training tab: fine-tune the dual encoder on uploaded image-caption pairs.

One job per server at a time. It belongs to the user session that started it: only that
session (or the operator, with the admin token) may stop it; everyone sees its status. It runs
in its own thread, outside the model concurrency group, so the other tabs keep serving; if
its page goes away (the request is cancelled), the job stops at its next step.

Models and runs live in the data dir (mmcore.datadir): a restart lists finished models again
and offers to resume runs that were cut short, from their last checkpoint.

On a ZeroGPU Space a GPU is lent per call for a limited time, to a separate worker: there the
job runs in the request as a series of `@spaces.GPU` calls (`train_chunk`), each training
for CHUNK_SECONDS and checkpointing, the next resuming it; the plot updates after each.
"""

import hmac
import logging
import shutil
import threading
import time
import zipfile

import gradio as gr
import pandas as pd

import mmcore
from mmcore import InputError, archives, demo_data, train, train_data
from mmcore.datadir import RESTART_NOTICE
from mmcore.device import gpu_task, on_zero_gpu
from mmcore.text import as_number
from mmcore.train import PARTS

from .context import AppContext, guarded, session_owner, text_md
from .files import uploaded

TITLE = "Fine-tune"
HOW_TO_LOAD = """{name}: a dual encoder fine-tuned with mmcore (the base model with trained
projection heads, or towers, as chosen).

Load it in Python, with the kit it was trained from:

    import mmcore
    # the kit it came from ("offline", "hub" or "tiny"), this zip unpacked into a folder
    kit = mmcore.load_kit("offline", dual_encoder="path/to/the/unzipped/folder")
    scores = kit.zero_shot(image, ["a cat", "a dog"])

In the app, a fine-tuned model appears in the Zero-shot and Retrieval model lists.
"""
log = logging.getLogger("mmcore.app")
CHUNK_SECONDS = 60          # training per ZeroGPU call
GPU_SECONDS = 180           # a call's GPU loan: the chunk, plus loading and validation


class TrainingJob:
    """The server's one training job: its thread, stop event, progress rows and owner."""

    def __init__(self):
        self.lock = threading.Lock()
        self.thread = None
        self.stop = threading.Event()
        self.rows: list = []
        self.result = None
        self.error = ""
        self.name = ""
        self.owner = None          # the session hash that started it (never shown)
        self.in_chunks = False     # ZeroGPU: running as GPU calls from its request

    @property
    def running(self) -> bool:
        return self.in_chunks or (self.thread is not None and self.thread.is_alive())

    def status(self) -> str:
        if self.running:
            last = self.rows[-1] if self.rows else None
            if not last:
                return f"Training {self.name}: preparing (measuring the base model)…"
            per_step = last["seconds"] / max(1, len(self.rows))
            left = per_step * (last["steps"] - last["step"])
            return (f"Training {self.name}: step {last['step']}/{last['steps']}, loss "
                    f"{last['loss']:.4f}, {per_step:.2f} s/step, about {left:.0f} s left.")
        if self.error:
            return f"The last job failed: {text_md(self.error)}"
        if self.result is not None and self.result.checkpoint is None:
            return f"{self.name} stopped before any model was saved: {text_md(self.result.reason)}."
        if self.result is not None:
            return f"{self.name} finished{' (stopped)' if self.result.stopped else ''}."
        if self.name:
            return f"{self.name} ended before it finished; it can be resumed."
        return "No training job yet."


# every metric series, named and coloured up front: the legend never depends on which
# series the first update happened to hold (validation recall arrives once an epoch ends)
METRICS = {"in-batch accuracy": "#2563eb", "val i2t_r1": "#16a34a", "val t2i_r1": "#dc2626",
           "val i2t_r5": "#9333ea", "val t2i_r5": "#ea580c"}


def loss_frame(rows: list) -> pd.DataFrame:
    # typed even when empty: the plot reads its axes' types (numbers, not labels) from them
    return pd.DataFrame([{"step": r["step"], "loss": r["loss"]} for r in rows],
                        columns=["step", "loss"]).astype({"step": int, "loss": float})


def metrics_frame(rows: list) -> pd.DataFrame:
    frame = [{"step": r["step"], "value": r["accuracy"], "series": "in-batch accuracy"}
             for r in rows]
    frame += [{"step": r["step"], "value": r[k], "series": f"val {k}"} for r in rows
              for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5") if k in r]
    # the plot fixes its colours from the first update it gets: every series is in each one
    # (a blank point until its first value)
    frame += [{"step": 0, "value": None, "series": name} for name in METRICS]
    return pd.DataFrame(frame, columns=["step", "value", "series"]).astype(
        {"step": int, "value": float, "series": str})


def compare(result) -> list:
    if result is None:
        return []
    return [[k, round(result.before.get(k, float("nan")), 3), round(v, 3)]
            for k, v in result.after.items()]


def report_md(summary: str) -> str:
    """A data report (names and captions are the user's text) as escaped Markdown."""
    return "\n".join("- " + text_md(line[2:]) if line.startswith("- ") else text_md(line)
                     for line in summary.splitlines())


def build(ctx: AppContext) -> None:
    job = TrainingJob()
    ctx.training = job
    demo_lock = threading.Lock()

    def demo_set():
        """The bundled demo set, written once into a folder of the app's own."""
        folder = ctx.work_dir / "demo-set"
        with demo_lock:
            if not (folder / "captions.csv").exists():
                demo_data.make(folder)
        return folder

    def unpack(file, use_demo: bool, dest, budget) -> tuple:
        """(folder, notes): the upload extracted into `dest` (an upload always wins), else
        the demo set when asked for (copied to `dest` when given), with the archive entries
        that were left out."""
        upload = uploaded(file, "training data")
        if upload is None and use_demo:
            return (demo_set() if dest is None else shutil.copytree(demo_set(), dest)), []
        if upload is None:
            raise InputError("Upload a .zip of images with captions, or click 'Use the demo "
                             "set'.")
        folder, _, skipped = archives.safe_extract(
            upload.path, tuple(train_data.IMAGE_SUFFIXES) + (".csv", ".jsonl", ".txt"), dest,
            budget)
        return folder, [f"skipped {n} in the archive: {why}" for n, why in skipped[:50]]

    @guarded
    def validate(file=None, use_demo: bool = False, request: gr.Request = None):
        """The validation report of an upload (or of the demo set). The images are checked in
        a worker; if this request is cancelled, the worker stops at the next image."""
        with ctx.files.request(request) as work:
            demo = bool(use_demo) and uploaded(file, "training data") is None
            folder, notes = unpack(file, demo, None if demo else work / "data",
                                   ctx.files.budget(request))
            stop, out = threading.Event(), {}

            def check():
                try:
                    out["report"] = train_data.load_pairs(folder, stop_event=stop)
                except Exception as exc:  # noqa: BLE001 - re-raised in the handler
                    out["error"] = exc

            worker = threading.Thread(target=check, name="mmcore-validate", daemon=True)
            worker.start()
            try:
                while worker.is_alive():
                    # yield first: Gradio can close (cancel) a generator only once it has
                    # yielded; a cancel during the first step would go unseen
                    yield "Checking the images…"
                    worker.join(0.5)
            finally:
                stop.set()
                worker.join()              # the request folder goes only after the worker
            if "error" in out:
                raise out["error"]
            out["report"].notices += notes
            source = "the demo set" if demo else "your upload"
            yield f"**Data: {source}.** " + report_md(out["report"].summary())

    def options_from(epochs, batch_size, lr, weight_decay, warmup, parts, accum, seed) -> dict:
        if parts not in PARTS:
            raise InputError(f"Train must be one of {', '.join(PARTS)}.")
        return dict(epochs=as_number(epochs, "Epochs", integer=True),
                    batch_size=as_number(batch_size, "Batch size", integer=True),
                    lr=as_number(lr, "Learning rate"),
                    weight_decay=as_number(weight_decay, "Weight decay"),
                    warmup=as_number(warmup, "Warm-up share"), train=parts,
                    accum_steps=as_number(accum, "Accumulation steps", integer=True),
                    seed=as_number(seed, "Seed", 0, 2**32 - 1, integer=True))

    def begin(run, request) -> str:
        """Make `run` the job (the caller holds job.lock); returns its resume key."""
        job.stop.clear()
        job.rows, job.result, job.error, job.name = [], None, "", run.name
        job.owner = getattr(request, "session_hash", None)
        return ctx.data.claim(run, session_owner(request))

    def owned(status: str, key: str) -> str:
        """The status as the page that runs the job sees it: with the run's resume key."""
        return (f"{status}\n\nResume key of this run: `{key}` (a page reload starts a new "
                "session: with the key, that page can resume the run if it is cut short).")

    def failed(run, exc) -> None:
        job.error = str(exc) if isinstance(exc, mmcore.MmcoreError) else \
            f"{type(exc).__name__} (logged on the server)"
        if not isinstance(exc, mmcore.MmcoreError):
            log.exception("training failed", exc_info=exc)
        ctx.data.finish(run, "failed", job.error)

    def ended(run, out, result) -> None:
        """A killed process never gets here: its run stays "running", to be resumed."""
        job.result = result
        ctx.data.finish(run, "stopped" if result.stopped else "finished")
        if result.checkpoint is not None:          # else nothing was saved: no model to use
            ctx.forget_kit(run.name)
            ctx.checkpoints[run.name] = str(out)

    def launch(run, data, request) -> str:
        """Start `run` in the job's thread (the caller holds job.lock); its resume key."""
        out = ctx.data.model(run)
        key = begin(run, request)

        def work():
            try:
                result = mmcore.finetune(ctx.kit, data, out, stop_event=job.stop,
                                         progress=job.rows.append, **run.options)
            except Exception as exc:  # noqa: BLE001 - shown to every user, logged
                failed(run, exc)
                return
            ended(run, out, result)

        job.thread = threading.Thread(target=work, name="mmcore-train", daemon=True)
        job.thread.start()
        return key

    @gpu_task(GPU_SECONDS)
    def train_chunk(data: str, out: str, options: dict, resume: str):
        """One ZeroGPU call's share of a run: train for CHUNK_SECONDS, checkpoint, return."""
        return mmcore.finetune(ctx.kit, data, out, resume=resume, time_budget=CHUNK_SECONDS,
                               **options)

    def in_chunks(run, data, request, key):
        """ZeroGPU: the run as GPU calls made from this request (the caller holds job.lock
        for the start only); progress is streamed after each call."""
        out, result = ctx.data.model(run), None
        try:
            for result in train.chunks(
                    lambda resume: train_chunk(str(data), str(out), run.options, resume),
                    "auto", job.stop):
                job.rows = list(result.history)
                rows = list(job.rows)
                yield owned(job.status(), key), loss_frame(rows), metrics_frame(rows), \
                    gr.skip(), gr.skip()
            if result is not None:
                ended(run, out, result)
        except Exception as exc:  # noqa: BLE001 - shown to every user, logged
            failed(run, exc)
        finally:
            job.in_chunks = False   # a closed request leaves its run "running": resumable
        yield from final(request, key)

    def final(request, key):
        zipped = None
        if job.result is not None and job.result.checkpoint is not None:
            target = ctx.files.download(request, f"{job.name}.zip")
            zipped = shutil.make_archive(str(target.with_suffix("")), "zip",
                                         ctx.data.models / job.name)
            with zipfile.ZipFile(zipped, "a") as zf:
                zf.writestr("HOW-TO-LOAD.txt", HOW_TO_LOAD.format(name=job.name))
        rows = list(job.rows)
        cut = job.result is None or job.result.stopped          # it may be resumed
        yield owned(job.status(), key) if cut else job.status(), loss_frame(rows), \
            metrics_frame(rows), compare(job.result), zipped

    def follow(request, key):
        """Stream the job's progress; if this request goes away first, the job stops."""
        done = False
        try:
            while job.running:
                rows = list(job.rows)
                yield owned(job.status(), key), loss_frame(rows), metrics_frame(rows), \
                    gr.skip(), gr.skip()
                time.sleep(1.0)
            done = True
        finally:
            if not done:
                job.stop.set()
        yield from final(request, key)

    def run_job(run, data, request):
        """The job in this server's way: GPU calls on ZeroGPU, else a background thread
        (the caller holds job.lock; it is released before the streaming starts)."""
        if on_zero_gpu():
            key = begin(run, request)
            job.in_chunks = True            # the job is taken before the lock goes
            return in_chunks(run, data, request, key)
        return follow(request, launch(run, data, request))

    @guarded
    def start(file=None, use_demo=False, epochs=5, batch_size=32, lr=1e-3, weight_decay=0.05,
              warmup=0.1, parts="projections", accum=1, seed=0, run_name="",
              request: gr.Request = None):
        """Start fine-tuning (one job per server) and stream its progress."""
        options = options_from(epochs, batch_size, lr, weight_decay, warmup, parts, accum, seed)
        mmcore.train.TrainOptions(**options).check()
        with job.lock:
            if job.running:
                raise InputError(job.status() + " Only one training job runs at a time.")
            left = ctx.data_left()
            if left <= 0:    # runs cut short keep their data (up to a GB): oldest go first
                freed = ctx.data.free_cut_short(1 - left)
                if freed:
                    log.info("data dir full: dropped the data of cut-short runs %s", freed)
                left = ctx.data_left()
            if left <= 0:
                raise InputError(
                    f"This server's storage for fine-tuned models is full "
                    f"({ctx.data_disk_mb:,} MB). Download the models you want to keep; the "
                    "operator can remove old ones (or raise --data-disk-mb).")
            run = ctx.data.new_run(options, run_name if isinstance(run_name, str) else "")
            try:
                data, _ = unpack(file, bool(use_demo), ctx.data.data(run),
                                 min(archives.MAX_TOTAL, left))
            except Exception:
                ctx.data.finish(run, "failed", "bad data")
                raise
            stream = run_job(run, data, request)
        yield from stream

    @guarded
    def resume(name: str | None = None, key: str = "", request: gr.Request = None):
        """Resume a run that was cut short (the server stopped, or its user stopped it),
        from its last checkpoint, with the same data and options: in the session that ran
        it, with its resume key, or by anyone after a server restart."""
        with job.lock:
            if job.running:
                raise InputError(job.status() + " Only one training job runs at a time.")
            cut = {r.name: r for r in ctx.data.cut_short()}
            if not isinstance(name, str) or name not in cut:
                raise InputError(f"No run named {str(name)[:80]!r} can be resumed.")
            if not ctx.data.may_resume(cut[name], session_owner(request),
                                       key if isinstance(key, str) else None):
                raise InputError(f"Run {name!r} was cut short in another session: give its "
                                 "resume key (shown on the page that ran it), or wait for a "
                                 "server restart.")
            run = cut[name]
            run.state = "running"
            ctx.data.save(run)
            stream = run_job(run, ctx.data.data(run), request)
        yield from stream

    @guarded
    def stop(request: gr.Request = None):
        """Stop the running job at its next step (only the session that started it, or the
        operator: header `X-Mmcore-Admin: <admin token>`); the last checkpoint is kept."""
        if not job.running:
            return job.status()
        mine = job.owner is not None and getattr(request, "session_hash", None) == job.owner
        headers = getattr(request, "headers", None) or {}
        token = headers.get("x-mmcore-admin", "") if hasattr(headers, "get") else ""
        admin = bool(ctx.admin_token) and bool(token) and \
            hmac.compare_digest(str(token).encode(), ctx.admin_token.encode())
        if not (mine or admin):
            raise InputError("Only the session that started this job can stop it; its "
                             "status shows here for everyone.")
        job.stop.set()
        return "Stopping at the next step…"

    def status():
        """The training job's status, for everyone (read-only)."""
        return job.status()

    def resumable(request: gr.Request = None):
        return gr.update(choices=ctx.resumable(request), value=None)

    gr.Markdown(
        f"Fine-tune **{ctx.kit.spec('dual_encoder').name}** on your own image-caption pairs "
        "(symmetric InfoNCE over in-batch negatives, as in CLIP). Upload a .zip of images with "
        "`captions.csv` (columns image, caption), `captions.jsonl` or sidecar `.txt` files, "
        "or try the bundled demo set. The result appears in the Zero-shot and Retrieval tabs "
        "and is kept across restarts.")
    if ctx.data.lost_on_restart:
        gr.Markdown(RESTART_NOTICE)
    with gr.Row():
        file = gr.File(label="Data (.zip)", file_types=[".zip"])
        with gr.Column():
            demo_btn = gr.Button("Use the demo set (drawn shapes + packaged photos)")
            check = gr.Button("Validate the data")
    # what the data is: an upload selects the upload, the button the demo set (the API's
    # `use_demo` flag; an upload still wins)
    use_demo = gr.Checkbox(value=False, visible=False, label="Use the demo set")
    report = gr.Markdown(label="Data report")
    with gr.Row():
        epochs = gr.Slider(1, 100, value=20, step=1, label="Epochs")
        batch_size = gr.Slider(2, 256, value=16, step=1, label="Batch size")
        accum = gr.Slider(1, 16, value=1, step=1, label="Accumulation steps")
        lr = gr.Number(value=3e-3, label="Learning rate")
    with gr.Row():
        weight_decay = gr.Number(value=0.05, label="Weight decay (2-D weights)")
        warmup = gr.Slider(0, 0.5, value=0.1, step=0.05, label="Warm-up share")
        parts = gr.Radio(list(PARTS), value="projections", label="Train",
                         info="projections: heads only (towers cached); text: + text tower; "
                              "image: + both towers")
        seed = gr.Number(value=0, precision=0, label="Seed")
    with gr.Row():
        run_name = gr.Textbox(label="Name of the fine-tuned model (blank: a timestamp)",
                              value="", max_length=60, placeholder="e.g. shapes-v1")
        go = gr.Button("Start", variant="primary")
        halt = gr.Button("Stop", variant="stop")
    with gr.Row():
        # any name may come in (an API client names its run; the list fills on focus):
        # `resume` checks it is a run this session may resume
        runs = gr.Dropdown(ctx.resumable(), label="Runs cut short (resume from the last "
                                                  "checkpoint)", value=None,
                           allow_custom_value=True)
        resume_key = gr.Textbox(label="Resume key (shown on the page that ran it)",
                                value="", max_length=40)
        again = gr.Button("Resume")
    status_md = gr.Markdown(job.status(), label="Status")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", label="Training loss")
        metrics_plot = gr.LinePlot(x="step", y="value", color="series", color_map=METRICS,
                                   y_lim=[0, 1], label="Accuracy and validation recall",
                                   color_title="")   # no title row: the legend fits
    before_after = gr.Dataframe(headers=["validation metric", "base", "fine-tuned"],
                                interactive=False, label="Before and after")
    download = gr.File(label="Fine-tuned model (.zip)")
    outputs = [status_md, loss_plot, metrics_plot, before_after, download]
    check.click(validate, [file, use_demo], report, api_name="validate_training_data",
                preprocess=False)
    # a new upload: the last report was about other data
    file.upload(lambda: (False, ""), None, [use_demo, report], api_visibility="private")
    demo_btn.click(lambda: (True, None), None, [use_demo, file], api_visibility="private").then(
        validate, [file, use_demo], report, preprocess=False, api_visibility="private")
    go.click(start, [file, use_demo, epochs, batch_size, lr, weight_decay, warmup, parts, accum,
                     seed, run_name], outputs, api_name="train", preprocess=False,
             concurrency_id="train", concurrency_limit=4)
    again.click(resume, [runs, resume_key], outputs, api_name="resume_training",
                concurrency_id="train", concurrency_limit=4)
    runs.focus(resumable, None, runs, api_visibility="private")
    halt.click(stop, None, status_md, api_name="stop_training")
    gr.Button("Refresh status", size="sm").click(status, None, status_md,
                                                 api_name="training_status")
    ctx.on_page_load(status, [status_md])
