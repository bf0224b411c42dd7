"""Training tab: fine-tune the dual encoder on uploaded image-caption pairs.

One job per server at a time (others see who is training and how far along); it runs in its
own thread, outside the model concurrency group, so the other tabs keep serving. The result
appears as a choice in the zero-shot and retrieval tabs and can be downloaded as a zip.
"""

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd

import mmcore
from mmcore import InputError, demo_data, train_data
from mmcore.train import PARTS, TrainOptions

from .context import AppContext, guarded
from .zero_shot import upload_path

TITLE = "Fine-tune"


class TrainingJob:
    """The server's one training job: its thread, stop event and progress rows."""

    def __init__(self):
        self.lock = threading.Lock()
        self.thread = None
        self.stop = threading.Event()
        self.rows: list = []
        self.result = None
        self.error = ""
        self.name = ""

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

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
            return f"The last job failed: {self.error}"
        if self.result is not None:
            return f"{self.name} finished{' (stopped)' if self.result.stopped else ''}."
        return "No training job yet."


def data_folder(file, use_demo: bool) -> Path:
    if use_demo or file is None:
        if not use_demo:
            raise InputError("Upload a .zip of images with captions, or tick 'use the demo set'.")
        return demo_data.make(Path(tempfile.mkdtemp(prefix="mmcore-demo-set-",
                                                    dir=os.environ.get("GRADIO_TEMP_DIR"))))
    return Path(upload_path(file))


def plot_frame(rows: list) -> pd.DataFrame:
    frame = [{"step": r["step"], "value": r["loss"], "series": "loss"} for r in rows]
    frame += [{"step": r["step"], "value": r["accuracy"], "series": "in-batch accuracy"}
              for r in rows]
    frame += [{"step": r["step"], "value": r[k], "series": f"val {k}"} for r in rows
              for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5") if k in r]
    return pd.DataFrame(frame or [{"step": 0, "value": 0.0, "series": "loss"}])


def compare(result) -> list:
    if result is None:
        return []
    return [[k, round(result.before.get(k, float("nan")), 3), round(v, 3)]
            for k, v in result.after.items()]


def build(ctx: AppContext) -> None:
    job = TrainingJob()

    @guarded
    def validate(file, use_demo: bool):
        """The validation report of an upload (or of the demo set)."""
        report = train_data.load_pairs(data_folder(file, use_demo))
        return report.summary()

    @guarded
    def start(file, use_demo, epochs, batch_size, lr, weight_decay, warmup, parts, accum, seed):
        """Start fine-tuning (one job per server) and stream its progress."""
        with job.lock:
            if job.running:
                raise InputError(job.status() + " Only one training job runs at a time.")
            options = TrainOptions(epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
                                   weight_decay=float(weight_decay), warmup=float(warmup),
                                   train=parts, accum_steps=int(accum), seed=int(seed)).check()
            data = data_folder(file, use_demo)
            name = f"finetuned-{time.strftime('%H%M%S')}"
            out = Path(tempfile.mkdtemp(prefix="mmcore-train-",
                                        dir=os.environ.get("GRADIO_TEMP_DIR"))) / name
            job.stop.clear()
            job.rows, job.result, job.error, job.name = [], None, "", name

            def run():
                try:
                    job.result = mmcore.finetune(ctx.kit, data, out, stop_event=job.stop,
                                                 progress=job.rows.append,
                                                 **options.__dict__)
                    ctx.checkpoints[name] = str(out)
                except Exception as exc:  # noqa: BLE001 - shown to every user, logged
                    job.error = str(exc) if isinstance(exc, mmcore.MmcoreError) else \
                        f"{type(exc).__name__} (logged on the server)"
                    if not isinstance(exc, mmcore.MmcoreError):
                        import logging

                        logging.getLogger("mmcore.app").exception("training failed")

            job.thread = threading.Thread(target=run, name="mmcore-train", daemon=True)
            job.thread.start()
        while job.running:
            time.sleep(1.0)
            yield job.status(), plot_frame(list(job.rows)), gr.skip(), gr.skip()
        zipped = None
        if job.result is not None:
            zipped = shutil.make_archive(str(out), "zip", out)
        yield job.status(), plot_frame(list(job.rows)), compare(job.result), zipped

    def stop():
        """Stop the running job at its next step; the last checkpoint is kept."""
        job.stop.set()
        return "Stopping at the next step…"

    def poll():
        return job.status()

    gr.Markdown(
        f"Fine-tune **{ctx.kit.spec('dual_encoder').name}** on your own image-caption pairs "
        "(symmetric InfoNCE over in-batch negatives, as in CLIP). Upload a .zip of images with "
        "`captions.csv` (columns image, caption), `captions.jsonl` or sidecar `.txt` files, "
        "or try the bundled demo set. The result appears in the Zero-shot and Retrieval tabs.")
    with gr.Row():
        file = gr.File(label="Data (.zip)", file_types=[".zip"])
        with gr.Column():
            use_demo = gr.Checkbox(label="Use the demo set (drawn shapes + packaged photos)",
                                   value=True)
            check = gr.Button("Validate the data")
    report = gr.Markdown()
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
        go = gr.Button("Start", variant="primary")
        halt = gr.Button("Stop", variant="stop")
    status = gr.Markdown(job.status())
    plot = gr.LinePlot(x="step", y="value", color="series", label="Loss, accuracy, recall",
                       height=300)
    before_after = gr.Dataframe(headers=["validation metric", "base", "fine-tuned"],
                                interactive=False, label="Before and after")
    download = gr.File(label="Fine-tuned model (.zip)")
    check.click(validate, [file, use_demo], report, api_name="validate_training_data",
                preprocess=False)
    go.click(start, [file, use_demo, epochs, batch_size, lr, weight_decay, warmup, parts, accum,
                     seed], [status, plot, before_after, download], api_name="train",
             preprocess=False, concurrency_id="train", concurrency_limit=4)
    halt.click(stop, None, status, api_name="stop_training", queue=False)
    ctx.on_page_load(poll, [status])
