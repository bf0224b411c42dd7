"""Contrastive fine-tuning of a dual encoder on image-caption pairs (CLIP's recipe).

One code path for `mmcore.finetune(...)`, the app's Training tab and
`python -m mmcore.train DATA --out DIR` (also under `torchrun` and `accelerate launch`). The
trainer knows the model only through the dual encoder's training surface
(`dual_encoder.py`: trainable_copy, trainable_parameters, tower_features, project, save, load).

- Loss: `losses.clip_loss`, symmetric InfoNCE over in-batch negatives, learnable
  temperature (clamped in place after each optimiser step, as CLIP and open_clip do).
- Parts to train: "projections" (heads and temperature), "text" (+ text tower), "image"
  (+ both towers). A tower that is not trained runs once (its features are cached), so an
  epoch costs only what is trained. Towers train in eval mode: no dropout (so no global RNG)
  and frozen BatchNorm statistics (small batches make poor ones).
- `accelerate` places the model, picks mixed precision by device (`device.mixed_precision`:
  bf16, fp16 with a loss scaler, none on the CPU; towers included) and wraps it in DDP with one
  process per device. Features are all-gathered with gradients, so negatives span the global
  batch and two processes compute exactly what one does on the combined batch.
- Gradient accumulation keeps every in-batch negative: embeddings of all micro-batches are
  computed first without gradients, then each micro-batch is recomputed with gradients
  against the cached rest (open_clip's accum-freq), so the gradient equals the full batch's.
- Batches: `train_batches` (a DistributedSampler; DataLoader workers decode the images).
- AdamW with weight decay on 2-D weights only; transformers' linear warm-up + cosine
  schedule. Randomness comes from seeded generators (the global RNG is never reseeded: a
  server runs this in a thread), so CPU runs are reproducible.
- Every option is checked. A step whose loss or gradients are not finite stops the run
  before it changes the weights; the last finite checkpoint is kept. Out of GPU memory is a
  clear message, and the memory is given back for the next request.
- Checkpoints (see `train_state`): weights, options, fingerprint, AdamW moments and the
  scheduler, written atomically each epoch and on stop. `resume` says what to do with a
  checkpoint already in `out_dir`: resume it only when data, model and options match.
  `time_budget` pauses a run after that many seconds (checkpointed), so a long run can span
  several time-limited GPU calls (ZeroGPU: `chunks`), each resuming the last.
"""

import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import cache, losses, train_batches, train_state
from .device import mixed_precision
from .errors import InputError
from .train_data import DataReport, load_pairs, split
from .train_options import PARTS, TrainOptions  # noqa: F401 - PARTS is public here too

PAUSED = "paused: this call's time budget is spent (resume continues the run)"


@dataclass
class FinetuneResult:
    checkpoint: Path | None         # None only when no finite model was ever saved
    before: dict
    after: dict
    history: list = field(default_factory=list)     # one dict per step: loss, accuracy, ...
    stopped: bool = False                           # ended before the last step
    reason: str = ""                                # why it stopped (stop asked, NaN loss...)
    resumed_from: int = 0                           # the step a resumed run started at


class Embed(nn.Module):
    """What DDP wraps: the encoder's weights, and a forward from a batch to L2-normalised
    (image, text) embeddings and the logit scale. A batch holds tower inputs ("pixels",
    "texts") or, for a tower that is not trained, its cached features ("img_feats",
    "txt_feats")."""

    def __init__(self, encoder):
        super().__init__()
        self.weights = encoder.weights
        self.__dict__["encoder"] = encoder      # not registered twice: `weights` holds it all

    def forward(self, batch: dict) -> tuple:
        img, txt = batch.get("img_feats"), batch.get("txt_feats")
        if img is None or txt is None:
            tower_img, tower_txt = self.encoder.tower_features(
                batch.get("pixels") if img is None else None,
                batch.get("texts") if txt is None else None)
            img = tower_img if img is None else img
            txt = tower_txt if txt is None else txt
        image, text = self.encoder.project(img, txt)
        return image.float(), text.float(), losses.logit_scale(self.encoder.log_logit_scale)


def gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, in rank order, keeping gradients for this rank's rows (as open_clip:
    the backward sums every rank's gradient of its rows)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    import warnings

    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():       # deprecated for a functional form without autograd
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_fn.all_gather(x))


def _split(batch: dict, parts: int) -> list:
    size = len(batch["texts"] if "texts" in batch else batch["txt_feats"])
    out = []
    for rows in torch.arange(size).tensor_split(min(parts, size)):
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        out.append({k: v[lo:hi] for k, v in batch.items()})
    return out


def step_loss(model, batch: dict, accum_steps: int, backward=torch.Tensor.backward):
    """Loss of one optimiser step, backpropagated with `backward`; equal gradients with or
    without accumulation (embeddings of the other micro-batches are cached, open_clip style)."""
    if accum_steps == 1:
        img, txt, scale = model(batch)
        loss = losses.clip_loss(gather(img), gather(txt), scale)
        backward(loss)
        return float(loss.detach()), losses.in_batch_accuracy(img.detach(), txt.detach())
    chunks = _split(batch, accum_steps)
    with torch.no_grad():
        cached = [model(chunk)[:2] for chunk in chunks]
    total = 0.0
    for k, chunk in enumerate(chunks):
        img_k, txt_k, scale = model(chunk)
        # the temperature's gradient once; `0 * scale` keeps it in every backward (DDP
        # expects a gradient for each trained weight in each backward)
        scale = scale if k == 0 else scale.detach() + 0 * scale
        imgs = torch.cat([img_k if j == k else c[0] for j, c in enumerate(cached)])
        txts = torch.cat([txt_k if j == k else c[1] for j, c in enumerate(cached)])
        loss = losses.clip_loss(gather(imgs), gather(txts), scale)
        backward(loss)        # each micro-batch carries the gradient through its own rows only
        total = float(loss.detach())
    imgs = torch.cat([c[0] for c in cached])
    txts = torch.cat([c[1] for c in cached])
    return total, losses.in_batch_accuracy(imgs, txts)


def recall_at(model, img_feats, txt_feats, ks=(1, 5)) -> dict:
    """Validation recall@k in both directions, from tower features."""
    with torch.no_grad():
        img, txt, _ = model({"img_feats": img_feats, "txt_feats": txt_feats})
    return losses.recall_at_k(img, txt, ks)


def _features(encoder, pairs: list, workers: int, texts: bool = True) -> tuple:
    """Tower features of every pair, without gradients: (images, texts or None)."""
    batches = [list(range(s, min(s + 32, len(pairs)))) for s in range(0, len(pairs), 32)]
    imgs, txts = [], []
    with torch.no_grad():
        for _, pixels, captions in train_batches.loader(pairs, encoder.image_inputs, batches,
                                                        workers, 0):
            img, txt = encoder.tower_features(pixels, list(captions) if texts else None)
            imgs.append(img)
            txts.append(txt)
    return torch.cat(imgs), (torch.cat(txts) if texts else None)


def _optimizer(params: list, opts: TrainOptions, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup

    decay = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=opts.lr)
    warm = round(opts.warmup * total_steps)
    return opt, get_cosine_schedule_with_warmup(opt, warm, total_steps)


def _finite(params: list, grads: bool = False) -> bool:
    tensors = [p.grad if grads else p for p in params]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def _save(encoder, part: str, out: Path, state: dict, optimizer, schedule) -> None:
    """A checkpoint; AdamW's moments and the schedule only while the run has steps left
    (`optimizer` None at the last step): they weigh twice the trained weights (185 of a
    text-tower run's 265 MB), and a finished run never resumes."""
    with cache.atomic_folder(out, train_state.KEY) as tmp:
        encoder.save(tmp, part)
        if optimizer is not None:
            train_state.save_optimizer(tmp, optimizer, schedule)
        (tmp / "training.json").write_text(json.dumps(state))


def default_workers() -> int:
    """Image-decoding processes: a few, never all the cores (the model needs them)."""
    return max(0, min(4, (os.cpu_count() or 1) - 2))


def finetune(kit, data, out_dir, stop_event=None, progress=None, resume: str = "auto",
             overwrite: bool = False, time_budget: float | None = None,
             workers: int | None = None, **options) -> FinetuneResult:
    """Fine-tune the kit's dual encoder on a folder or .zip of images and captions.

    progress(dict) is called after every step with loss, accuracy, step, steps, seconds.
    resume: what to do with a checkpoint already in `out_dir`:
      "auto" (default): resume it when data, model and options match (its fingerprint),
        AdamW moments and schedule included; refuse when it is anything else;
      "never": start afresh, replacing it;
      "require": resume it, or refuse if there is none that matches.
    A folder of other files at `out_dir` is refused unless `overwrite=True`.
    time_budget: pause (checkpointed; reason `PAUSED`) after the step that passes this many
    seconds; the next call with resume="auto" continues exactly where it paused.
    workers: processes decoding images (default `default_workers()`).
    Under torchrun / accelerate launch, create `accelerate.PartialState()` before loading the
    kit (as `main` does), so that each process loads it on its own device.
    """
    from .lanes import PRIORITY

    try:
        with PRIORITY.long():          # a scheduler decodes on its kept threads meanwhile
            return _finetune(kit, data, out_dir, stop_event, progress, resume, overwrite,
                             time_budget, default_workers() if workers is None else workers,
                             options)
    except torch.cuda.OutOfMemoryError:
        pass          # leave the except block first: its traceback holds the run's tensors
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise InputError("The GPU ran out of memory while training. Try a smaller batch size, "
                     "more accumulation steps (same negatives, less memory) or training "
                     "fewer parts (projections).")


def _finetune(kit, data, out_dir, stop_event, progress, resume, overwrite, time_budget,
              workers, options) -> FinetuneResult:
    from accelerate import Accelerator

    unknown = set(options) - set(TrainOptions.__dataclass_fields__)
    if unknown:
        raise InputError(f"Unknown training option(s): {', '.join(sorted(unknown))}.")
    opts = TrainOptions(**options).check()
    base = kit.encoder() if hasattr(kit, "encoder") else kit
    out = Path(out_dir)
    cache.check_target(out, overwrite)           # before any work: never the user's files
    report = data if isinstance(data, DataReport) else load_pairs(data)
    if not report.pairs:
        raise InputError("No usable image-caption pairs.\n" + report.summary())
    train, val = split(report.pairs, opts.val_fraction, opts.seed)
    if len(train) < 2:
        raise InputError("Need at least two training pairs.\n" + report.summary())
    accelerator = Accelerator(cpu=base.device.type == "cpu",
                              mixed_precision=mixed_precision(base.device))
    rank, world = accelerator.process_index, accelerator.num_processes
    if time_budget is not None and world > 1:       # ranks' clocks would pause at other steps
        raise InputError("time_budget is for a run in one process.")
    fp = train_state.fingerprint(report.pairs, base.identity, {**asdict(opts), "world": world})
    saved = train_state.resume_point(out, fp, resume, overwrite)
    encoder = base.trainable_copy(opts.train, f"{getattr(base, 'name', 'clip')}+{out.name}")
    embed = Embed(encoder)
    val_feats = _features(encoder, val, workers) if val else None
    before = recall_at(embed, *val_feats) if val else {}
    # the frozen-tower cache: a tower that is not trained runs once, not every epoch
    train_feats = _features(encoder, train, workers) if opts.train == "projections" else None
    image_cache = _features(encoder, train, workers, texts=False)[0] \
        if opts.train == "text" else None
    plan = [b for epoch in range(opts.epochs) for b in train_batches.epoch_batches(
        len(train), opts.batch_size, epoch, opts.seed, rank, world)]
    total, steps_per_epoch = len(plan), len(plan) // opts.epochs
    params = encoder.trainable_parameters(opts.train)
    for p in encoder.weights.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer, schedule = _optimizer(params, opts, total)
    history, start_step = [], 0
    if saved is not None:
        encoder.load(out)
        if saved["step"] < total:                     # a finished run keeps no optimiser
            train_state.load_optimizer(out, optimizer, schedule)
        start_step, history = saved["step"], saved["history"]
    encoder.weights.eval()          # no dropout (global RNG), frozen BatchNorm statistics
    model = accelerator.prepare_model(embed)                 # DDP across processes
    stepper = accelerator.prepare_optimizer(optimizer)       # the fp16 loss scaler
    if opts.train == "image":                                # decoded by the loader's workers
        batches = iter(train_batches.loader(train, encoder.image_inputs, plan[start_step:],
                                            workers, opts.seed))
    else:
        batches = ((torch.tensor(b), None, [train[i].caption for i in b])
                   for b in plan[start_step:])
    state = {"fingerprint": fp, "options": asdict(opts), "pairs": len(report.pairs)}
    kept = start_step if saved is not None else None     # step of the checkpoint on disk
    reason, done = "", start_step
    started = time.perf_counter()
    from .lanes import PRIORITY

    for step in range(start_step, total):
        if stop_event is not None and stop_event.is_set():
            reason = "stopped on request"
            break
        if time_budget is not None and step > start_step and \
                time.perf_counter() - started >= time_budget:
            reason = PAUSED
            break
        PRIORITY.wait_turn()      # a short request (fill-mask, a search) runs between steps
        idx, pixels, captions = next(batches)
        if train_feats is not None:
            batch = {"img_feats": train_feats[0][idx], "txt_feats": train_feats[1][idx]}
        elif image_cache is not None:
            batch = {"img_feats": image_cache[idx], "texts": list(captions)}
        else:
            batch = {"pixels": pixels.to(accelerator.device), "texts": list(captions)}
        stepper.zero_grad(set_to_none=True)
        loss, acc = step_loss(model, batch, opts.accum_steps, accelerator.backward)
        scaled = accelerator.scaler is not None          # fp16: the scaler skips inf steps
        if not (math.isfinite(loss) and (scaled or _finite(params, grads=True))):
            # stop before this step touches the weights: they are still the last finite ones
            reason = f"the loss became non-finite ({loss}) at step {step + 1}"
            break
        stepper.step()
        losses.clamp_log_scale_(encoder.log_logit_scale)     # after the step, as CLIP does
        if not accelerator.optimizer_step_was_skipped:
            schedule.step()
        if not _finite(params):
            reason = f"the weights became non-finite at step {step + 1}"
            break
        row = {"step": step + 1, "steps": total, "epoch": step // steps_per_epoch + 1,
               "loss": loss, "accuracy": acc, "lr": schedule.get_last_lr()[0],
               "seconds": time.perf_counter() - started}
        if (step + 1) % steps_per_epoch == 0 and val:
            row.update(recall_at(embed, *val_feats))
            if accelerator.is_main_process:
                _save(encoder, opts.train, out,
                      {**state, "step": step + 1, "history": history + [row]},
                      optimizer if step + 1 < total else None, schedule)
            kept = step + 1
        history.append(row)
        done = step + 1
        if progress is not None:
            progress(row)
    if reason.startswith("the "):
        # never publish a non-finite model: back to the last finite checkpoint, if any
        if kept is not None:
            encoder.load(out)
            reason += f"; kept the last finite checkpoint (step {kept})"
        else:
            reason += "; no finite checkpoint was saved before it"
    elif (reason or not val) and kept != done:
        if accelerator.is_main_process:
            _save(encoder, opts.train, out, {**state, "step": done, "history": history},
                  optimizer if done < total else None, schedule)
        kept = done
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    for p in encoder.weights.parameters():
        p.requires_grad_(False)
    encoder._text_cache.clear()
    after = recall_at(embed, *val_feats) if val and kept is not None else {}
    return FinetuneResult(out if kept is not None else None, before, after, history,
                          stopped=done < total, reason=reason, resumed_from=start_step)


def chunks(run_chunk, resume: str = "auto", stop_event=None):
    """A long run as several calls of `run_chunk(resume)` (a `finetune` with a time budget,
    e.g. under `@spaces.GPU(duration=...)` on ZeroGPU): yields each call's result; each call
    after the first resumes the checkpoint the last one paused at."""
    result = run_chunk(resume)
    yield result
    while result.reason == PAUSED and not (stop_event is not None and stop_event.is_set()):
        result = run_chunk("require")
        yield result


OPTION_HELP = {
    "epochs": "passes over the training pairs",
    "batch_size": "pairs per optimiser step (the in-batch negatives)",
    "accum_steps": "micro-batches per step (same negatives, less memory)",
    "lr": "peak learning rate (linear warm-up, cosine decay)",
    "weight_decay": "AdamW weight decay, on 2-D weights only",
    "warmup": "share of the steps spent warming up",
    "train": "what learns: the projections only, + the text tower, or + both towers",
    "val_fraction": "share of the pairs held out for recall@k",
    "seed": "seed of the data split and order",
}


def _workers(text: str) -> int:
    import argparse

    if not text.isdigit() or int(text) > 64:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 64, not {text!r}")
    return int(text)


def parser():
    import argparse

    from .kits import KIT_NAMES

    p = argparse.ArgumentParser(
        prog="mmcore-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fine-tune the kit's dual encoder (CLIP's contrastive loss) on your own "
                    "image-caption pairs. Under torchrun or `accelerate launch`, one process "
                    "per device.")
    p.add_argument("data", help="folder or .zip of images with captions.csv, captions.jsonl "
                                "or a .txt caption beside each image")
    p.add_argument("--out", required=True, help="folder for the fine-tuned model")
    p.add_argument("--kit", choices=KIT_NAMES, default=os.environ.get("MMCORE_KIT", "offline"),
                   help="model kit whose dual encoder is fine-tuned ($MMCORE_KIT)")
    p.add_argument("--resume", choices=train_state.RESUME, default="auto",
                   help="auto: resume a checkpoint in --out made from the same data, model "
                        "and options, refuse anything else; never: start afresh over it; "
                        "require: resume or fail")
    p.add_argument("--workers", type=_workers, default=default_workers(),
                   help="processes decoding images (0: in the training process)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds files mmcore did not write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, value in asdict(TrainOptions()).items():
        extra = {"choices": PARTS} if name == "train" else {}
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                       help=OPTION_HELP.get(name, name), **extra)
    return p


def _report(report: DataReport) -> None:
    """The data report on stderr: each skipped file with its reason, then the summary."""
    for name, why in report.unreadable:
        print(f"skipped {name}: {why}", file=sys.stderr)
    for name in report.missing_images:
        print(f"skipped caption row {name}: no such image", file=sys.stderr)
    for name in report.uncaptioned:
        print(f"skipped {name}: no caption", file=sys.stderr)
    for name in report.empty_captions:
        print(f"skipped {name}: empty caption", file=sys.stderr)
    print(report.summary().splitlines()[0], file=sys.stderr)


def main(argv=None) -> int:
    """mmcore-train DATA --out DIR [--epochs N ...]: results on stdout; progress, the data
    report and errors on stderr. Exit 0 done, 1 nothing usable (no pairs, the model cannot
    load, no checkpoint saved), 2 a bad argument or input."""
    from tqdm import tqdm

    from . import load_kit
    from .errors import cli_status

    args = vars(parser().parse_args(argv))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # before the kit loads: one process per device (set_device(LOCAL_RANK)), NCCL on GPUs
        PartialState(cpu=os.environ.get("MMCORE_DEVICE") == "cpu")
    data, out, kit_name = args.pop("data"), args.pop("out"), args.pop("kit")
    quiet = args.pop("quiet")
    main_process = os.environ.get("RANK", "0") == "0"          # one process prints
    bar = None

    def show(row):
        nonlocal bar
        if bar is None:                    # made after the data report: its own lines
            bar = tqdm(unit="step", desc="training", file=sys.stderr,
                       disable=quiet or not main_process)
        bar.total = row["steps"]
        bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        bar.update(row["step"] - bar.n)

    def body() -> int:
        options = {k: v for k, v in args.items() if k in TrainOptions.__dataclass_fields__}
        TrainOptions(**options).check()            # a bad option fails before the data
        report = load_pairs(data, require=False)
        if main_process:
            _report(report)
        if len(report.pairs) < 2:
            print("error: fewer than two usable image-caption pairs; nothing to train on.",
                  file=sys.stderr)
            return 1
        result = finetune(load_kit(kit_name), report, out, progress=show, **args)
        if main_process:
            if result.reason:
                print(f"stopped: {result.reason}", file=sys.stderr)
            print(f"before {result.before}\nafter  {result.after}\n"
                  f"checkpoint {result.checkpoint}")
        return 0 if result.checkpoint is not None else 1

    try:
        return cli_status(body, "interrupted (a checkpoint saved so far is kept; --resume "
                                "auto continues it)")
    finally:
        if bar is not None:
            bar.close()


if __name__ == "__main__":
    raise SystemExit(main())
