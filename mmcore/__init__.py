"""mmcore: using and looking inside multimodal foundation models.

The public API (see DESIGN.md):

    kit = mmcore.load_kit("offline" | "hub" | "tiny")   # roles load lazily, once
    kit.model("causal_lm")          # the role's typed object (roles.CausalLM, MaskedLM, ...)
"""

from . import tables
from .errors import InputError, MmcoreError, ModelUnavailable
from .index import Index
from .kits import KIT_NAMES, ROLES, Kit, ModelSpec, load_kit
from .train import finetune

__all__ = ["load_kit", "Kit", "ModelSpec", "KIT_NAMES", "ROLES", "MmcoreError", "InputError",
           "ModelUnavailable", "Index", "finetune", "tables"]
