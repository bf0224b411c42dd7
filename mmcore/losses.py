"""Contrastive losses, each one pure function (as in HF's `clip_loss` and open_clip's ClipLoss).

    clip_loss(image, text, logit_scale) = (CE(logits, diag) + CE(logits^T, diag)) / 2,
    logits = logit_scale * image @ text^T over the in-batch pairs (row i matches column i).
"""

import math

import torch
from torch.nn import functional as F

MAX_LOGIT_SCALE = 100.0   # CLIP clamps exp(log scale) at 100 so the temperature cannot collapse


def logit_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """exp(log_scale), unclamped: a clamp in the forward pass has zero gradient at its bound,
    and float32(ln 100) lies just above math.log(100), so a temperature that starts at 100
    (ConSE, pretrained CLIP) would never learn. Clamp the parameter after each step instead."""
    return log_scale.exp()


@torch.no_grad()
def clamp_log_scale_(log_scale: torch.Tensor) -> None:
    """Keep the learnable log temperature in [0, ln MAX_LOGIT_SCALE], in place, after an
    optimiser step (as CLIP and open_clip do)."""
    log_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch negatives. image, text: (N, D), L2-normalised."""
    logits = logit_scale * image @ text.T                                   # (N, N)
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def in_batch_accuracy(image: torch.Tensor, text: torch.Tensor) -> float:
    """Share of images whose own caption is their best match in the batch (and vice versa)."""
    sim = image @ text.T
    target = torch.arange(len(image), device=image.device)
    return float(((sim.argmax(1) == target).float().mean() +
                  (sim.argmax(0) == target).float().mean()) / 2)


def recall_at_k(image: torch.Tensor, text: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Image-to-text and text-to-image recall@k of paired rows (image i goes with text i)."""
    sim = image @ text.T                                                     # (N, N)
    target = torch.arange(len(image), device=image.device)[:, None]
    out = {}
    for k in ks:
        kk = min(k, len(image))
        out[f"i2t_r{k}"] = float((sim.topk(kk, 1).indices == target).any(1).float().mean())
        out[f"t2i_r{k}"] = float((sim.T.topk(kk, 1).indices == target).any(1).float().mean())
    return out
