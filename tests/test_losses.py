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


def test_logit_scale_is_clamped():
    assert abs(float(losses.clamp_logit_scale(torch.tensor(10.0))) - 100.0) < 1e-4
    assert float(losses.clamp_logit_scale(torch.tensor(-3.0))) == 1.0
    x = torch.tensor(2.0, requires_grad=True)
    losses.clamp_logit_scale(x).backward()
    assert float(x.grad) > 0


def test_recall_at_k_by_hand():
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])   # rows 1 and 2 swapped
    text = text + 0.1 * torch.eye(3)          # break ties: each text leans to its own image
    r = losses.recall_at_k(image, text, ks=(1, 2))
    assert abs(r["i2t_r1"] - 1 / 3) < 1e-6 and abs(r["t2i_r1"] - 1 / 3) < 1e-6
    assert r["i2t_r2"] == 1.0 and r["t2i_r2"] == 1.0
