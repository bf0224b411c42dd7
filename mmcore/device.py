"""Device and precision, decided once, at the edge.

Model code follows `tensor.device`; only the kit asks this module where to put a model.
`MMCORE_DEVICE` overrides the choice (e.g. `cpu` on a GPU machine).

GPU work goes through `gpu_task`: on a ZeroGPU Space (the `spaces` package present) a
function runs under `@spaces.GPU(duration=...)`, which lends it a GPU for that long; anywhere
else the function is returned unchanged and runs on whatever `pick_device` chose.
"""

import contextlib
import os

import torch


def pick_device() -> torch.device:
    forced = os.environ.get("MMCORE_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device: torch.device):
    """bf16 on a GPU that has it (Ampere and later), fp16 on older ones (a T4 has no bf16),
    None on the CPU (mixed precision there is a per-role weight choice, not autocast)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def mixed_precision(device: torch.device) -> str:
    """The same choice in accelerate's words: "bf16", "fp16" or "no"."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast_dtype(device), "no")


def autocast(device: torch.device, enabled: bool = True):
    """Autocast at `autocast_dtype(device)`; a no-op context on the CPU."""
    dtype = autocast_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(device: torch.device):
    """A GradScaler where fp16 autocast needs one (its gradients underflow); else a disabled
    one, whose scale/step/update calls pass straight through."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device) == torch.float16)


def on_zero_gpu() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu_task(duration: int):
    """Decorator for a function that does GPU work taking up to `duration` seconds.

    With the `spaces` package installed (Hugging Face Spaces) it is `spaces.GPU(duration=)`,
    which on ZeroGPU hardware attaches a GPU for the call and is a no-op elsewhere; without
    the package it returns the function unchanged. Apply it when the app is built (ZeroGPU
    registers decorated functions at start-up), to plain functions or generators.
    """
    def wrap(fn):
        try:
            import spaces
        except ImportError:
            return fn
        gpu = getattr(spaces, "GPU", None)      # a stray folder named "spaces" is not it
        return fn if gpu is None else gpu(duration=int(duration))(fn)
    return wrap
