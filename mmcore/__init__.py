"""mmcore: using and looking inside multimodal foundation models.

The public API (see DESIGN.md):

    kit = mmcore.load_kit("offline" | "hub" | "tiny")   # roles load lazily, once
    kit.model("causal_lm")          # the role's typed object (roles.CausalLM, MaskedLM, ...)
"""

from . import tables
from .errors import InputError, MmcoreError, ModelUnavailable
from .kits import KIT_NAMES, ROLES, Kit, ModelSpec, load_kit

__all__ = ["load_kit", "Kit", "ModelSpec", "KIT_NAMES", "ROLES", "MmcoreError", "InputError",
           "ModelUnavailable", "Index", "finetune", "tables"]


def __getattr__(name):
    # imported on first use, so `python -m mmcore.index` / `-m mmcore.train` run their module
    # once (no runpy "found in sys.modules" warning) and `import mmcore` stays light
    if name == "Index":
        from .index import Index
        return Index
    if name == "finetune":
        from .train import finetune
        return finetune
    raise AttributeError(f"module 'mmcore' has no attribute {name!r}")
