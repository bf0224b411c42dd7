"""Contrastive fine-tuning of a dual encoder on image-caption pairs (CLIP's recipe).

One code path for `mmcore.finetune(...)`, the app's Training tab and
`python -m mmcore.train DATA --out DIR` (also under torchrun / accelerate launch).

- Loss: `losses.clip_loss`, symmetric InfoNCE over in-batch negatives, learnable
  temperature (clamped in place after each optimiser step, as CLIP and open_clip do).
- Parts to train: "projections" (heads and temperature), "text" (+ text tower),
  "image" (+ both towers). With both towers frozen their features are computed once and
  cached, so an epoch costs only the heads. Towers train in eval mode: no dropout (so no
  global RNG) and frozen BatchNorm statistics (small batches make poor ones).
- Gradient accumulation keeps every in-batch negative: features of all micro-batches are
  computed first without gradients, then each micro-batch is recomputed with gradients
  against the cached rest (open_clip's accum-freq), so the gradient equals the full batch's.
- Distributed: features are all-gathered (with gradients) so negatives span the global batch.
- AdamW with weight decay on 2-D weights only; transformers' linear warm-up + cosine
  schedule. Randomness comes from a `torch.Generator` seeded by `seed` (the global RNG is
  never reseeded: a server runs this in a thread), so CPU runs are reproducible.
- Every option is checked (numbers finite and in range). A step whose loss or gradients are
  not finite stops the run before it changes the weights; the last finite checkpoint is
  kept and the result says why it stopped.
- Checkpoints (see `train_state`): weights, options, fingerprint, AdamW moments and the
  scheduler, written atomically each epoch and on stop. `resume` says what to do with a
  checkpoint already in `out_dir`: resume it only when data, model and options match.
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from . import cache, losses, train_state
from .device import autocast
from .errors import InputError
from .images import load_image
from .train_data import load_pairs, split
from .train_options import PARTS, TrainOptions  # noqa: F401 - PARTS is public here too

@dataclass
class FinetuneResult:
    checkpoint: Path | None         # None only when no finite model was ever saved
    before: dict
    after: dict
    history: list = field(default_factory=list)     # one dict per step: loss, accuracy, ...
    stopped: bool = False                           # ended before the last step
    reason: str = ""                                # why it stopped (stop asked, NaN loss...)
    resumed_from: int = 0                           # the step a resumed run started at


class _Trainable:
    """The pieces of a TowerDualEncoder the trainer needs, by part."""

    def __init__(self, encoder, towers=()):
        self.enc, self.module, self.towers = encoder, encoder, towers

    @property
    def log_scale(self):
        return self.enc.log_logit_scale

    def image_towers(self, pils):
        pixels = torch.stack([self.enc.transform(im) for im in pils]).to(self.enc.device)
        return self.enc.image_features(pixels)

    def text_towers(self, texts):
        enc = self.enc.tokenizer(texts, padding=True, truncation=True,
                                 max_length=self.enc.max_text_tokens, return_tensors="pt")
        return F.normalize(self.enc.text_features(dict(enc.to(self.enc.device))), dim=-1)

    def project(self, img_feats, txt_feats):
        return (F.normalize(self.enc.image_projection(img_feats), dim=-1),
                F.normalize(self.enc.text_projection(txt_feats), dim=-1))

    def parameters(self, part: str) -> list:
        params = [self.enc.image_projection.weight, self.enc.text_projection.weight,
                  self.enc.log_logit_scale]
        if part in ("text", "image"):
            params += list(self.enc.text_model.parameters())
        if part == "image":
            params += list(self.enc.image_model.parameters())
        return params

    def set_mode(self, part: str) -> None:
        """Eval mode everywhere, trained towers included: dropout would draw on the global
        RNG (shared with every other request) and BatchNorm statistics of small batches
        are poor; shared frozen towers must not move either."""
        self.enc.eval()

    def save(self, folder) -> None:
        self.enc.save_head(folder, self.towers)

    def load(self, folder) -> None:
        self.enc.load_head(folder)


class _ClipTrainable(_Trainable):
    """The same pieces of a Hugging Face CLIPModel; checkpoints are CLIPModel folders that
    `CLIPModel.from_pretrained` (and so any tab, as a dual encoder) loads."""

    def __init__(self, encoder):
        self.enc, self.module, self.clip = encoder, encoder.model, encoder.model

    @property
    def log_scale(self):
        return self.clip.logit_scale

    def image_towers(self, pils):
        pixels = self.enc.processor(images=pils, return_tensors="pt")["pixel_values"]
        return self.clip.vision_model(pixel_values=pixels.to(self.enc.device)).pooler_output

    def text_towers(self, texts):
        enc = self.enc.tokenizer(texts, padding=True, truncation=True,
                                 max_length=self.enc.max_text_tokens, return_tensors="pt")
        return self.clip.text_model(**enc.to(self.enc.device)).pooler_output

    def project(self, img_feats, txt_feats):
        return (F.normalize(self.clip.visual_projection(img_feats), dim=-1),
                F.normalize(self.clip.text_projection(txt_feats), dim=-1))

    def parameters(self, part: str) -> list:
        params = [self.clip.visual_projection.weight, self.clip.text_projection.weight,
                  self.clip.logit_scale]
        if part in ("text", "image"):
            params += list(self.clip.text_model.parameters())
        if part == "image":
            params += list(self.clip.vision_model.parameters())
        return params

    def set_mode(self, part: str) -> None:
        self.clip.eval()                    # as above: no dropout, no global RNG

    def save(self, folder) -> None:
        self.clip.save_pretrained(folder)
        self.enc.processor.save_pretrained(folder)

    def load(self, folder) -> None:
        from safetensors.torch import load_file

        state = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            state.update(load_file(str(f)))
        self.clip.load_state_dict(state, strict=False)
        self.enc._text_cache.clear()


def trainable_fork(base, opts: "TrainOptions", name: str) -> _Trainable:
    """A trainable copy of the kit's dual encoder; the shared one keeps serving unchanged."""
    import copy

    from .dual_encoder import ClipEncoder, TowerDualEncoder

    if isinstance(base, TowerDualEncoder):
        towers = {"projections": (), "text": ("text_model",),
                  "image": ("text_model", "image_model")}[opts.train]
        return _Trainable(base.fork(copy_text=opts.train in ("text", "image"),
                                    copy_image=opts.train == "image", name=name), towers)
    if isinstance(base, ClipEncoder):
        # trained in fp32 even when the shared model runs bf16 (`fast` precision)
        return _ClipTrainable(ClipEncoder(copy.deepcopy(base.model).float(), base.processor, name))
    raise InputError(f"Cannot fine-tune a {type(base).__name__}.")


def gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, in rank order, keeping gradients for this rank's rows."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x))


def step_loss(model: _Trainable, img_feats, txt_feats, accum_steps: int):
    """Loss of one optimiser step, backpropagated; equal gradients with or without
    accumulation (features of the other micro-batches are cached, open_clip style)."""
    scale = losses.logit_scale(model.log_scale)
    if accum_steps == 1:
        img, txt = model.project(img_feats, txt_feats)
        loss = losses.clip_loss(gather(img), gather(txt), scale)
        loss.backward()
        return float(loss.detach()), losses.in_batch_accuracy(img.detach(), txt.detach())
    chunks = list(zip(img_feats.chunk(accum_steps), txt_feats.chunk(accum_steps)))
    with torch.no_grad():
        cached = [model.project(i, t) for i, t in chunks]
    total = 0.0
    for k, (i, t) in enumerate(chunks):
        scale = losses.logit_scale(model.log_scale)
        scale = scale if k == 0 else scale.detach()      # the temperature's gradient, once
        img_k, txt_k = model.project(i, t)
        imgs = torch.cat([img_k if j == k else c[0] for j, c in enumerate(cached)])
        txts = torch.cat([txt_k if j == k else c[1] for j, c in enumerate(cached)])
        loss = losses.clip_loss(gather(imgs), gather(txts), scale)
        # each micro-batch's backward carries the gradient through its own rows only
        loss.backward()
        total = float(loss.detach())
    imgs = torch.cat([c[0] for c in cached])
    txts = torch.cat([c[1] for c in cached])
    return total, losses.in_batch_accuracy(imgs, txts)


def recall_at(model: _Trainable, img_feats, txt_feats, ks=(1, 5)) -> dict:
    """Validation recall@k in both directions, from tower features."""
    with torch.no_grad():
        img, txt = model.project(img_feats, txt_feats)
    return losses.recall_at_k(img, txt, ks)


def _features(model: _Trainable, pairs: list, batch: int = 32, texts: bool = True) -> tuple:
    """Tower features of every pair, without gradients: (images, texts or None)."""
    imgs, txts = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            imgs.append(model.image_towers([load_image(p.image) for p in chunk]))
            if texts:
                txts.append(model.text_towers([p.caption for p in chunk]))
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


def _save(model: _Trainable, out: Path, state: dict, optimizer, schedule) -> None:
    with cache.atomic_folder(out, train_state.KEY) as tmp:
        model.save(tmp)
        train_state.save_optimizer(tmp, optimizer, schedule)
        (tmp / "training.json").write_text(json.dumps(state))


def finetune(kit, data, out_dir, stop_event=None, progress=None, resume: str = "auto",
             overwrite: bool = False, **options) -> FinetuneResult:
    """Fine-tune the kit's dual encoder on a folder or .zip of images and captions.

    progress(dict) is called after every step with loss, accuracy, step, steps, seconds.
    resume: what to do with a checkpoint already in `out_dir`:
      "auto" (default): resume it when data, model and options match (its fingerprint),
        AdamW moments and schedule included; refuse when it is anything else;
      "never": start afresh, replacing it;
      "require": resume it, or refuse if there is none that matches.
    A folder of other files at `out_dir` is refused unless `overwrite=True`.
    """
    unknown = set(options) - set(TrainOptions.__dataclass_fields__)
    if unknown:
        raise InputError(f"Unknown training option(s): {', '.join(sorted(unknown))}.")
    opts = TrainOptions(**options).check()
    base = kit.encoder() if hasattr(kit, "encoder") else kit
    out = Path(out_dir)
    cache.check_target(out, overwrite)           # before any work: never the user's files
    report = load_pairs(data)
    train, val = split(report.pairs, opts.val_fraction, opts.seed)
    if len(train) < 2:
        raise InputError("Need at least two training pairs.\n" + report.summary())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    fp = train_state.fingerprint(report.pairs, base.identity, {**asdict(opts), "world": world})
    saved = train_state.resume_point(out, fp, resume, overwrite)
    model = trainable_fork(base, opts, f"{getattr(base, 'name', 'clip')}+{out.name}")
    encoder = model.module
    val_feats = _features(model, val) if val else None
    before = recall_at(model, *val_feats) if val else {}
    # the frozen-tower cache: a tower that is not trained runs once, not every epoch
    train_feats = _features(model, train) if opts.train == "projections" else None
    image_cache = _features(model, train, texts=False)[0] if opts.train == "text" else None
    steps_per_epoch = max(1, len(train) // (opts.batch_size * world))
    total = steps_per_epoch * opts.epochs
    params = model.parameters(opts.train)
    for p in encoder.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer, schedule = _optimizer(params, opts, total)
    history, start_step = [], 0
    if saved is not None:
        model.load(out)
        train_state.load_optimizer(out, optimizer, schedule)
        start_step, history = saved["step"], saved["history"]
    model.set_mode(opts.train)
    generator = torch.Generator().manual_seed(opts.seed)
    orders = [torch.randperm(len(train), generator=generator) for _ in range(opts.epochs)]
    state = {"fingerprint": fp, "options": asdict(opts), "pairs": len(report.pairs)}
    kept = start_step if saved is not None else None     # step of the checkpoint on disk
    reason, done = "", start_step
    started = time.perf_counter()
    from .lanes import PRIORITY

    for step in range(start_step, total):
        if stop_event is not None and stop_event.is_set():
            reason = "stopped on request"
            break
        PRIORITY.wait_turn()      # a short request (fill-mask, a search) runs between steps
        epoch, k = divmod(step, steps_per_epoch)
        idx = orders[epoch][k * opts.batch_size * world:(k + 1) * opts.batch_size * world]
        idx = idx[rank::world] if world > 1 else idx
        if train_feats is not None:
            img_f, txt_f = train_feats[0][idx], train_feats[1][idx]
        else:
            chunk = [train[int(i)] for i in idx]
            if image_cache is not None:
                img_f = image_cache[idx]
            else:
                img_f = model.image_towers([load_image(p.image) for p in chunk])
            txt_f = model.text_towers([p.caption for p in chunk])
        optimizer.zero_grad(set_to_none=True)
        with autocast(model.enc.device):
            loss, acc = step_loss(model, img_f, txt_f, opts.accum_steps)
        if world > 1:
            for p in params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        if not (math.isfinite(loss) and _finite(params, grads=True)):
            # stop before this step touches the weights: they are still the last finite ones
            reason = f"the loss became non-finite ({loss}) at step {step + 1}"
            break
        optimizer.step()
        losses.clamp_log_scale_(model.log_scale)         # after the step, as CLIP does
        schedule.step()
        if not _finite(params):
            reason = f"the weights became non-finite at step {step + 1}"
            break
        row = {"step": step + 1, "steps": total, "epoch": epoch + 1, "loss": loss,
               "accuracy": acc, "lr": schedule.get_last_lr()[0],
               "seconds": time.perf_counter() - started}
        if (step + 1) % steps_per_epoch == 0 and val:
            row.update(recall_at(model, *val_feats))
            if rank == 0:
                _save(model, out, {**state, "step": step + 1, "history": history + [row]},
                      optimizer, schedule)
            kept = step + 1
        history.append(row)
        done = step + 1
        if progress is not None:
            progress(row)
    if reason.startswith("the "):
        # never publish a non-finite model: back to the last finite checkpoint, if any
        if kept is not None:
            model.load(out)
            reason += f"; kept the last finite checkpoint (step {kept})"
        else:
            reason += "; no finite checkpoint was saved before it"
    elif rank == 0 and (reason or not val) and kept != done:
        _save(model, out, {**state, "step": done, "history": history}, optimizer, schedule)
        kept = done
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    model.enc._text_cache.clear()
    after = recall_at(model, *val_feats) if val and kept is not None else {}
    return FinetuneResult(out if kept is not None else None, before, after, history,
                          stopped=done < total, reason=reason, resumed_from=start_step)


def main(argv=None) -> int:
    """python -m mmcore.train DATA --out DIR [--epochs N ...]; under torchrun, one process
    per device with features all-gathered across them."""
    import argparse

    from . import load_kit

    p = argparse.ArgumentParser(prog="python -m mmcore.train")
    p.add_argument("data", help="folder or .zip of images with captions.csv/.jsonl/.txt")
    p.add_argument("--out", required=True)
    p.add_argument("--kit", default=os.environ.get("MMCORE_KIT", "offline"))
    p.add_argument("--resume", choices=train_state.RESUME, default="auto",
                   help="auto: resume a checkpoint in --out made from the same data, model "
                        "and options, refuse anything else; never: start afresh over it; "
                        "require: resume or fail")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds files mmcore did not write")
    for name, value in asdict(TrainOptions()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(p.parse_args(argv))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    data, out, kit_name = args.pop("data"), args.pop("out"), args.pop("kit")
    try:
        result = finetune(load_kit(kit_name), data, out,
                          progress=lambda r: print(f"step {r['step']}/{r['steps']} "
                                                   f"loss {r['loss']:.4f}", flush=True),
                          **args)
    except InputError as exc:
        print(f"error: {exc}")
        return 2
    if result.reason:
        print(f"stopped: {result.reason}")
    print(f"before {result.before}\nafter  {result.after}\ncheckpoint {result.checkpoint}")
    return 0 if result.checkpoint is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
