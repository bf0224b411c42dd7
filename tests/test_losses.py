"""The contrastive loss, checked against a hand computation."""

import math

import torch

from mmcore import losses


def test_clip_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(20.0, dtype=torch.float64)
    by_hand = 0.0
    for i in range(4):
        row = [20.0 * float(image[i] @ text[j]) for j in range(4)]
        col = [20.0 * float(image[j] @ text[i]) for j in range(4)]
        by_hand += -row[i] + math.log(sum(math.exp(v) for v in row))
        by_hand += -col[i] + math.log(sum(math.exp(v) for v in col))
    by_hand /= 2 * 4
    assert abs(float(losses.clip_loss(image, text, scale)) - by_hand) < 1e-12


def test_perfect_pairs_give_low_loss_and_full_accuracy():
    eye = torch.eye(6)
    assert float(losses.clip_loss(eye, eye, torch.tensor(100.0))) < 1e-3
    assert losses.in_batch_accuracy(eye, eye) == 1.0


def test_log_scale_is_clamped_after_the_step_not_in_the_forward():
    # float32(ln 100) lies just above math.log(100): a forward clamp there has zero gradient
    start = torch.tensor(math.log(100.0), dtype=torch.float32)
    assert float(start) > math.log(100.0)
    x = start.clone().requires_grad_(True)
    losses.logit_scale(x).backward()
    assert abs(float(x.grad) - 100.0) < 1e-3          # d exp(x) / dx = exp(x)
    for value, want in ((10.0, math.log(100.0)), (-3.0, 0.0), (2.0, 2.0)):
        p = torch.nn.Parameter(torch.tensor(value))
        losses.clamp_log_scale_(p)
        assert abs(float(p) - want) < 1e-6 and p.requires_grad


def test_recall_at_k_by_hand():
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])   # rows 1 and 2 swapped
    text = text + 0.1 * torch.eye(3)          # break ties: each text leans to its own image
    r = losses.recall_at_k(image, text, ks=(1, 2))
    assert abs(r["i2t_r1"] - 1 / 3) < 1e-6 and abs(r["t2i_r1"] - 1 / 3) < 1e-6
    assert r["i2t_r2"] == 1.0 and r["t2i_r2"] == 1.0
