"""Device and precision, decided once, at the edge.

Model code follows `tensor.device`; only the kit asks this module where to put a model.
`MMCORE_DEVICE` overrides the choice (e.g. `cpu` on a GPU machine).
"""

import contextlib
import os

import torch


def pick_device() -> torch.device:
    forced = os.environ.get("MMCORE_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # fp32 everywhere for loading: inference-time bf16 is opted into per role, where it
    # is shown to keep results right.
    return torch.float32


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op context on the CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
