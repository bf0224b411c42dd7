"""What a fine-tuning checkpoint remembers, so a run resumes exactly or not at all.

A checkpoint folder (written atomically, with mmcore's marker) holds the trained weights,
`training.json` (options, fingerprint, step, history) and the optimiser and scheduler
state: AdamW's moments as `optimizer.safetensors`, the rest as JSON (never pickle: a
checkpoint folder may come back from a user). A run resumes from it only when its
fingerprint matches: the same data (image bytes and captions), the same starting model and
the same options.
"""

import hashlib
import json
from pathlib import Path

import torch

from . import cache
from .errors import InputError

KEY = "mmcore-finetune-2"       # the checkpoint format; older ones are not resumed
RESUME = ("auto", "never", "require")


def fingerprint(pairs: list, model_identity: str, options: dict) -> dict:
    """{"data", "model", "options"}: what a checkpoint must match to be resumed."""
    data = hashlib.sha256()
    for pair in pairs:
        with open(pair.image, "rb") as f:
            data.update(hashlib.file_digest(f, "sha256").digest())
        data.update(pair.caption.encode("utf-8", "surrogatepass") + b"\0")
    return {"data": data.hexdigest(), "model": model_identity, "options": options}


def read(folder: Path) -> dict | None:
    """The saved training state of a checkpoint folder, or None if it holds none."""
    if not cache.is_complete(folder, KEY):
        return None
    try:
        state = json.loads((Path(folder) / "training.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "fingerprint" in state else None


def resume_point(folder: Path, fp: dict, resume: str, overwrite: bool) -> dict | None:
    """The state to resume from, None to start afresh, or a clear refusal.

    resume="auto": resume a matching checkpoint; refuse a folder holding anything else.
    resume="never": always start afresh (replacing an mmcore folder there).
    resume="require": resume a matching checkpoint, or refuse.
    """
    if resume not in RESUME:
        raise InputError(f"resume must be one of {', '.join(RESUME)}, not {resume!r}.")
    folder = Path(folder)
    cache.check_target(folder, overwrite)        # a folder of the user's own files: refused
    state = read(folder)
    if state is not None and state["fingerprint"] == fp and resume != "never":
        return state
    if resume == "require":
        why = "holds no checkpoint" if state is None else f"was trained with {_differs(state, fp)}"
        raise InputError(f"Cannot resume: '{folder.name}' {why}.")
    busy = folder.is_dir() and any(folder.iterdir())
    if resume == "auto" and busy and not overwrite:
        what = "something else" if state is None else \
            f"a checkpoint of a different run ({_differs(state, fp)})"
        raise InputError(f"'{folder.name}' holds {what}. Pass resume='never' (--resume never) "
                         "to start afresh over it, or choose another folder.")
    return None


def _differs(state: dict, fp: dict) -> str:
    old = state.get("fingerprint", {})
    parts = []
    if old.get("data") != fp["data"]:
        parts.append("different data")
    if old.get("model") != fp["model"]:
        parts.append("a different starting model")
    changed = [k for k in fp["options"] if old.get("options", {}).get(k) != fp["options"][k]]
    if changed:
        parts.append("different " + ", ".join(changed))
    return "; ".join(parts) or "a different setup"


def save_optimizer(folder: Path, optimizer, scheduler) -> None:
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{index}.{name}"] = value
    save_file(tensors, str(Path(folder) / "optimizer.safetensors"))
    (Path(folder) / "optimizer.json").write_text(json.dumps(
        {"param_groups": state["param_groups"], "plain": plain,
         "scheduler": scheduler.state_dict()}))


def load_optimizer(folder: Path, optimizer, scheduler) -> None:
    """Restore AdamW's moments and step counts and the scheduler; a damaged file is refused."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((Path(folder) / "optimizer.json").read_text())
        tensors = load_file(str(Path(folder) / "optimizer.safetensors"))
        slots: dict = {}
        for key, value in [*tensors.items(), *meta["plain"].items()]:
            index, name = key.split(".", 1)
            slots.setdefault(int(index), {})[name] = value
        groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
        device = optimizer.param_groups[0]["params"][0].device
        slots = {i: {n: v.to(device) if torch.is_tensor(v) and n != "step" else v
                     for n, v in s.items()} for i, s in slots.items()}
        optimizer.load_state_dict({"state": slots, "param_groups": groups})
        scheduler.load_state_dict(meta["scheduler"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise InputError(f"The checkpoint's optimiser state is damaged ({type(exc).__name__}); "
                         "start afresh with resume='never'.") from None
