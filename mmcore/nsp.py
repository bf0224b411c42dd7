"""Next-sentence prediction: P(second follows first).

The role object answers (`next_sentence(first, second)`):

- `roles.NSPHead`: the model's own NSP head (softmax over IsNext / NotNext), as transformers
  has it;
- `roles.CausalLM` (the offline kit): how much does reading `first` make `second` likelier?
That is the pointwise mutual information log P(second | first) - log P(second), taken per
token of `second`, mapped to a probability by a logistic regression fitted on real and
shuffled sentence pairs kept in `mmcore/data/nsp_pairs.tsv`:

    python -m mmcore.nsp     # refit on the offline kit, print accuracy, write the JSON
"""

import csv
import json
import math
from pathlib import Path

import torch

from . import lm_scoring
from .errors import InputError
from .roles import require
from .text import clean_text

DATA = Path(__file__).resolve().parent / "data"
PAIRS = DATA / "nsp_pairs.tsv"
CALIBRATION = DATA / "nsp_calibration.json"
SHUFFLE_OFFSET = 7        # negative i pairs first[i] with second[i + 7]


def next_sentence(role, first, second, batched: bool = False) -> float:
    """P(second follows first) from the kit's next_sentence role object. `batched`: the
    forward may be shared with concurrent requests (serving; equal up to float rounding)."""
    score = require(role, "next_sentence", "score sentence pairs")
    first = clean_text(first, "First sentence").strip()
    second = clean_text(second, "Second sentence").strip()
    return score(first, second, batched)


def logistic(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


def pmi_per_token(model, tok, first: str, second: str, batcher=None) -> float:
    """[log P(second | first) - log P(second)] / tokens(second). `batcher`: see
    lm_scoring.score_continuations."""
    cont = lm_scoring.encode(tok, " " + second)
    alone = lm_scoring.encode(tok, second)
    if not cont or not alone:
        raise InputError("Second sentence is empty.")
    limit = getattr(model.config, "max_position_embeddings", 2048)
    if len(lm_scoring.encode(tok, first)) + len(cont) + 1 > limit:
        raise InputError(f"The two sentences are longer than the model's {limit} tokens.")
    after_first = lm_scoring.run_prefix(model, tok, first, batcher)
    given = lm_scoring.score_continuations(model, after_first, [cont], batcher=batcher)
    at_start = lm_scoring.run_prefix(model, tok, "", batcher)
    prior = lm_scoring.score_continuations(model, at_start, [alone], batcher=batcher)
    return (given[0] - prior[0]) / len(cont)


def calibration(model_name: str) -> dict:
    table = json.loads(CALIBRATION.read_text()) if CALIBRATION.exists() else {}
    # a causal LM we have not calibrated: PMI > 0 means "follows", on a unit scale
    return table.get(model_name, {"weight": 1.0, "bias": 0.0})


def labelled_pairs() -> list:
    """[(first, second, 1 if real else 0)]: each real pair and one shuffled pair per first."""
    with PAIRS.open(encoding="utf-8") as f:
        rows = [(r["first"], r["second"]) for r in csv.DictReader(f, delimiter="\t")]
    n = len(rows)
    return [(a, b, 1) for a, b in rows] + \
           [(rows[i][0], rows[(i + SHUFFLE_OFFSET) % n][1], 0) for i in range(n)]


def fit_logistic(x: list, y: list, l2: float = 1e-3, steps: int = 100) -> tuple:
    """(weight, bias) of a 1-feature logistic regression, by Newton's method."""
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    X = torch.stack([xs, torch.ones_like(xs)], 1)
    w = torch.zeros(2, dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(X @ w)
        grad = X.T @ (p - ys) + l2 * w
        hess = X.T @ (X * (p * (1 - p)).unsqueeze(1)) + l2 * torch.eye(2, dtype=torch.float64)
        w = w - torch.linalg.solve(hess, grad)
    return float(w[0]), float(w[1])


def accuracy(x: list, y: list, weight: float, bias: float) -> float:
    return sum((weight * xi + bias > 0) == bool(yi) for xi, yi in zip(x, y)) / len(y)


def main() -> None:
    from . import load_kit

    lm = load_kit("offline").model("next_sentence")
    model, tok = lm.model, lm.tokenizer
    pairs = labelled_pairs()
    x = [pmi_per_token(model, tok, a, b) for a, b, _ in pairs]
    y = [label for _, _, label in pairs]
    weight, bias = fit_logistic(x, y)
    loo = sum(accuracy([x[i]], [y[i]], *fit_logistic(x[:i] + x[i + 1:], y[:i] + y[i + 1:]))
              for i in range(len(x))) / len(x)
    result = {"weight": weight, "bias": bias, "feature": "mean per-token PMI",
              "pairs": len(pairs), "train_accuracy": accuracy(x, y, weight, bias),
              "leave_one_out_accuracy": loo}
    table = json.loads(CALIBRATION.read_text()) if CALIBRATION.exists() else {}
    table[lm.name] = result
    CALIBRATION.write_text(json.dumps(table, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
