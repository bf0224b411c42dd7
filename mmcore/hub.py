"""Loading Hugging Face checkpoints for a role: hub ids and local folders, one code path.

The `hub` kit, the `tiny` kit (local folders of small random models) and any user-given
hub id or folder all go through `load_role`. Rules for anything a user names:
safetensors only, `trust_remote_code` never, and the architecture must fit the role.
With no network, a hub id that is not already cached fails within seconds.
"""

import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import ModelUnavailable
from .gqa import use_grouped_sdpa

OFFLINE_HINT = "Use `--kit offline` (or MMCORE_KIT=offline), which needs no network."
SPACE_HINT = ("On a Space: check the Space's logs for network errors, and list the models under "
              "`preload_from_hub` in the README's front matter so they are in the image.")


def offline_hint() -> str:
    """What to do when the hub cannot be reached: a Space has no offline kit to fall back on."""
    return SPACE_HINT if os.environ.get("SPACE_ID") else OFFLINE_HINT

# role -> (what it needs, an example) for messages
ROLE_NEEDS = {
    "masked_lm": ("a masked language model (AutoModelForMaskedLM)", "bert-base-uncased"),
    "next_sentence": ("a model with a next-sentence head (AutoModelForNextSentencePrediction)",
                      "bert-base-uncased"),
    "causal_lm": ("a causal language model (AutoModelForCausalLM)", "gpt2"),
    "dual_encoder": ("an image-text dual encoder with get_image_features/get_text_features "
                     "(e.g. CLIPModel)", "openai/clip-vit-base-patch32"),
}

_probe_lock = threading.Lock()
_probe = {"at": 0.0, "ok": False}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the hub endpoint? Cached for 30 s; never hangs."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    with _probe_lock:
        if time.monotonic() - _probe["at"] < 30:
            return _probe["ok"]
        url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        port = url.port or (443 if url.scheme == "https" else 80)
        result = {"ok": False}

        def attempt():  # getaddrinfo has no timeout of its own: run it in a thread
            try:
                socket.create_connection((url.hostname, port), timeout=timeout).close()
                result["ok"] = True
            except OSError:
                pass

        worker = threading.Thread(target=attempt, daemon=True)
        worker.start()
        worker.join(timeout + 0.5)
        _probe.update(at=time.monotonic(), ok=result["ok"])
        return result["ok"]


def is_local(source: str) -> bool:
    return Path(source).expanduser().is_dir() or source.startswith((".", "/", "~"))


def _hub_kwargs(source: str) -> dict:
    """`local_files_only` when the hub is unreachable; a clear error when not cached either."""
    if is_local(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ModelUnavailable(f"No such model folder: {source}")
        return {"local_files_only": True}
    if hub_reachable():
        return {}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return {"local_files_only": True}
    raise ModelUnavailable(
        f"Cannot reach the Hugging Face hub to fetch '{source}', and it is not in the local "
        f"cache. {offline_hint()}"
    )


def check_source(role: str, source: str) -> None:
    """Fast check (no weights read) that `source` can be had here; raises ModelUnavailable."""
    _hub_kwargs(source)


def _auto_class(role: str):
    import transformers as tf

    return {
        "masked_lm": tf.AutoModelForMaskedLM,
        "next_sentence": tf.AutoModelForNextSentencePrediction,
        "causal_lm": tf.AutoModelForCausalLM,
        "dual_encoder": tf.AutoModel,
    }[role]


def model_class(role: str, config):
    """The class that loads `config` for `role`, or a clear ModelUnavailable."""
    auto = _auto_class(role)
    needs, example = ROLE_NEEDS[role]
    cls = auto._model_mapping[type(config)] if type(config) in auto._model_mapping else None
    if role == "dual_encoder" and cls is not None:
        if not (hasattr(cls, "get_image_features") and hasattr(cls, "get_text_features")):
            cls = None
    if cls is None:
        archs = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
        raise ModelUnavailable(
            f"This checkpoint is a '{config.model_type}' model ({archs}); the {role} role needs "
            f"{needs}, e.g. {example}."
        )
    if role == "causal_lm" and not is_causal_checkpoint(config):
        archs = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
        raise ModelUnavailable(
            f"This checkpoint is a '{config.model_type}' model saved as {archs}, not a causal "
            f"(left-to-right) language model; generating with it gives nonsense. The causal_lm "
            f"role needs {needs}, e.g. {example}.")
    return cls


def is_causal_checkpoint(config) -> bool:
    """Was this checkpoint trained to predict the next token? transformers gives encoder
    families (BERT, RoBERTa...) a causal-LM class too, which only makes sense for a checkpoint
    saved as a decoder; any other BERT would generate garbage from a random-ish head."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    causal = set()
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update([names] if isinstance(names, str) else names)
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a in causal for a in archs):
        return False
    encoder_family = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return not encoder_family or bool(getattr(config, "is_decoder", False))


def check_load_report(role: str, source: str, info: dict) -> None:
    """Refuse a model with weights the checkpoint did not have: transformers initialises
    them at random (a BertForMaskedLM loaded for NSP scores every pair ~0.5)."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ModelUnavailable(
            f"'{source}' lacks weights the {role} role needs, so they would be random: {shown}. "
            f"It was probably saved for another task; {ROLE_NEEDS[role][0]} is needed.")
    if info.get("mismatched_keys"):
        raise ModelUnavailable(f"'{source}' has weights of the wrong shape for its config: "
                               f"{', '.join(str(k) for k in list(info['mismatched_keys'])[:6])}.")


def check_tokenizer(role: str, source: str, processor, config) -> None:
    """A folder without tokenizer files loads an empty tokenizer, and the first request then
    fails deep inside the model: refuse it here, by name."""
    tok = getattr(processor, "tokenizer", processor)
    text_config = getattr(config, "text_config", None) or config
    vocab = int(getattr(text_config, "vocab_size", 0) or 0)
    if tok is None or len(tok) < max(2, vocab // 2):
        raise ModelUnavailable(
            f"'{source}' has no usable tokenizer ({0 if tok is None else len(tok)} tokens for a "
            f"model of {vocab}): its tokenizer files (tokenizer.json, vocab.txt, vocab.json + "
            f"merges.txt, ...) are missing.")
    if role == "dual_encoder" and getattr(processor, "image_processor", None) is None:
        raise ModelUnavailable(f"'{source}' has no image processor (preprocessor_config.json).")


def load_role(role: str, source: str, device):
    """Load (model, tokenizer_or_processor) for `role` from a hub id or a local folder."""
    import transformers as tf

    kwargs = _hub_kwargs(source)
    kwargs["trust_remote_code"] = False
    try:
        config = tf.AutoConfig.from_pretrained(source, **kwargs)
    except ModelUnavailable:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelUnavailable(f"Cannot read a model config from '{source}': {exc}") from exc
    cls = model_class(role, config)
    if is_local(source) and not any(Path(source).expanduser().glob("*.safetensors")):
        raise ModelUnavailable(
            f"'{source}' holds no .safetensors weights; only safetensors checkpoints are loaded "
            f"(pickle-based .bin files can run code)."
        )
    try:
        # fp32 at load: each loader converts once to the kit's precision (precision.py)
        model, info = cls.from_pretrained(source, config=config, use_safetensors=True,
                                          dtype=torch.float32, output_loading_info=True,
                                          **kwargs)
        if role == "dual_encoder":
            processor = tf.AutoProcessor.from_pretrained(source, **kwargs)
        else:
            processor = tf.AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many types (SafetensorError...)
        raise ModelUnavailable(
            f"Cannot load '{source}' for the {role} role: {type(exc).__name__}: {exc}") from exc
    check_load_report(role, source, info)
    check_tokenizer(role, source, processor, config)
    model.eval().to(device)
    if role == "causal_lm":
        use_grouped_sdpa(model)         # masked batches of streams: one grouped SDPA call
    return model, processor


def load_role_model(source: str):
    """(AutoModel, tokenizer) of a text encoder from a hub id or folder, with the same
    safetensors-only and no-remote-code rules as `load_role`."""
    import transformers as tf

    kwargs = _hub_kwargs(source)
    if is_local(source) and not any(Path(source).expanduser().glob("*.safetensors")):
        raise ModelUnavailable(f"'{source}' holds no .safetensors weights.")
    try:
        model = tf.AutoModel.from_pretrained(source, use_safetensors=True,
                                             trust_remote_code=False, **kwargs)
        tokenizer = tf.AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelUnavailable(f"Cannot load a text encoder from '{source}': "
                               f"{type(exc).__name__}: {exc}") from exc
    return model.eval(), tokenizer
