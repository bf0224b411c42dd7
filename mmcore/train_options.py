"""Fine-tuning options: one small dataclass, every field checked before a run starts.

Numbers arrive from a browser, a CLI or Python: NaN, inf, 1e308, "inf", booleans and
fractions where a whole number belongs are refused with the allowed range in the message.
"""

import math
from dataclasses import dataclass

from .errors import InputError

PARTS = ("projections", "text", "image")


@dataclass
class TrainOptions:
    epochs: int = 5                 # passes over the training pairs
    batch_size: int = 32            # pairs per optimiser step (the in-batch negatives)
    accum_steps: int = 1            # micro-batches per step (same negatives, less memory)
    lr: float = 1e-3                # peak learning rate
    weight_decay: float = 0.05      # on 2-D weights only
    warmup: float = 0.1             # share of steps spent warming up linearly
    train: str = "projections"      # "projections", "text" or "image" (see module doc)
    val_fraction: float = 0.2       # held out for recall@k
    seed: int = 0                   # data split and order

    def check(self) -> "TrainOptions":
        """Every option converted and checked, with the allowed range in the message (NaN,
        inf, 1e308, "inf" and the like are refused, never trained with)."""
        if self.train not in PARTS:
            raise InputError(f"train must be one of {', '.join(PARTS)}, not {self.train!r}.")
        for name, low, high in (("epochs", 1, 1000), ("batch_size", 2, 4096),
                                ("accum_steps", 1, 64), ("seed", 0, 2**63 - 1)):
            setattr(self, name, _whole(name, getattr(self, name), low, high))
        if self.batch_size % self.accum_steps:
            raise InputError("batch_size must be a multiple of accum_steps.")
        # (name, low, high, low included, high included)
        for name, low, high, closed_low, closed_high in (
                ("lr", 0.0, 1.0, False, True), ("weight_decay", 0.0, 1.0, True, True),
                ("warmup", 0.0, 1.0, True, False), ("val_fraction", 0.0, 0.9, True, True)):
            setattr(self, name, _real(name, getattr(self, name), low, high, closed_low,
                                      closed_high))
        return self


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{name} must be a number, not {value!r}.")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise InputError(f"{name} must be a number, not {str(value)[:30]!r}.") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, not {str(value)[:30]}.")
    return number


def _whole(name: str, value, low: int, high: int) -> int:
    number = _number(name, value)
    if number != int(number) or not low <= number <= high:
        raise InputError(f"{name} must be a whole number between {low} and {high}, "
                         f"not {str(value)[:30]}.")
    return int(number)


def _real(name, value, low, high, closed_low=True, closed_high=True) -> float:
    number = _number(name, value)
    above = number >= low if closed_low else number > low
    below = number <= high if closed_high else number < high
    if not (above and below):
        span = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
        raise InputError(f"{name} must be in {span}, not {str(value)[:30]}.")
    return number
