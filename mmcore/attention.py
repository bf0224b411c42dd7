"""Looking at attention inside the models a kit runs.

`attention_maps(kit, which, text)` runs one model with eager attention (the fused kernels
never materialise the weights) and returns every layer's and head's softmax weights.
The shared model is never switched to eager: a twin that shares every weight runs instead,
so a request running meanwhile keeps its own attention implementation.
"""

import copy
import itertools
import threading
import weakref
import zlib
from dataclasses import dataclass, field

import torch

from . import transformer
from .errors import InputError
from .text import clean_text

MAX_TOKENS = 64
_twins: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()    # model -> eager twin
_twins_lock = threading.Lock()


@dataclass
class AttentionMaps:
    tokens: list             # the T tokens, readable
    weights: torch.Tensor    # (L, H, T, T) float32 on the CPU; rows sum to 1
    model_name: str
    notices: list = field(default_factory=list)

    def most_attended(self, layer: int, head: int | None = None) -> list:
        """[(token, the token it attends to most, weight)] for one layer (head None: mean)."""
        w = self.weights[layer].mean(0) if head is None else self.weights[layer, head]
        best = w.argmax(-1)
        return [(tok, self.tokens[int(j)], float(w[i, j])) for i, (tok, j) in
                enumerate(zip(self.tokens, best))]


def choices(kit) -> dict:
    """{label: key} of the models in `kit` whose attention can be shown."""
    from .roles import MaskedLM

    out = {}
    masked, causal = kit.spec("masked_lm"), kit.spec("causal_lm")
    if issubclass(kit.role_class("masked_lm"), MaskedLM):      # else the causal LM plays it
        out[f"masked LM: {masked.name}"] = "masked_lm"
    out[f"causal LM: {causal.name}"] = "causal_lm"
    out[f"text tower: {kit.spec('dual_encoder').name}"] = "text_tower"
    return out


def _resolve(kit, key: str):
    """(model that owns the attention setting, name of the part to run ("" = all of it),
    tokenizer)."""
    if key in ("masked_lm", "causal_lm"):
        return kit.model(key).attention_target()
    if key == "text_tower":
        enc = kit.model("dual_encoder")
        if isinstance(getattr(enc, "text_model", None), torch.nn.Module):   # a tower: MiniLM
            return enc.text_model, "", enc.tokenizer
        return enc.model, "text_model", enc.tokenizer                      # CLIP-like
    raise InputError(f"Unknown model choice {key!r}.")


def eager_twin(model):
    """A copy of `model` that runs eager attention and shares every parameter and buffer
    with it (no tensor is copied). Only the twin's own config copy is switched, so the
    shared model, and a request using it concurrently, is never touched."""
    with _twins_lock:
        twin = _twins.get(model)
        if twin is None:
            shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
            twin = copy.deepcopy(model, shared)
            if twin.config._attn_implementation != "eager":
                twin.set_attn_implementation("eager")
            _twins[model] = twin
        return twin


def readable(tokens: list) -> list:
    # byte-level BPE marks a leading space with "Ġ" and a newline with "Ċ"
    return [t.replace("Ġ", "␣").replace("Ċ", "⏎").replace("</w>", "") for t in tokens]


@torch.inference_mode()
def attention_maps(kit, key: str, text) -> AttentionMaps:
    text = clean_text(text, "Text", max_chars=2000).strip()
    owner, part, tok = _resolve(kit, key)
    twin = eager_twin(owner)
    module = getattr(twin, part) if part else twin
    ids = tok(text)["input_ids"]
    notices = []
    if len(ids) > MAX_TOKENS:
        notices.append(f"The text is {len(ids)} tokens; the first {MAX_TOKENS} are shown.")
    enc = tok(text, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    device = next(module.parameters()).device
    inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    from .lanes import PRIORITY

    with PRIORITY.short():          # short work: generation pauses between its steps meanwhile
        out = module(**inputs, output_attentions=True)
    if not out.attentions:
        raise InputError("This model does not report its attention weights.")
    weights = torch.stack([a[0].float().cpu() for a in out.attentions])      # (L, H, T, T)
    tokens = readable(tok.convert_ids_to_tokens(inputs["input_ids"][0].tolist()))
    name = {v: k for k, v in choices(kit).items()}.get(key, key)
    return AttentionMaps(tokens, weights, name, notices)


def worked_example(tokens: list, d_model: int = 8, n_heads: int = 2, seed: int = 0) -> dict:
    """One attention step of the from-scratch layer on up to 6 tokens, every piece shown.

    Each token gets a fixed random embedding (seeded by its text) plus the sinusoidal
    positional encoding; a seeded MultiHeadAttention projects them to Q, K and V.
    """
    tokens = list(tokens)[:6] or ["(empty)"]
    rows = []
    for t in tokens:
        g = torch.Generator().manual_seed(zlib.crc32(t.encode("utf-8")))
        rows.append(torch.randn(d_model, generator=g))
    x = torch.stack(rows).unsqueeze(0)                                       # (1, T, D)
    x = transformer.PositionalEncoding(d_model)(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mha = transformer.MultiHeadAttention(d_model, n_heads).eval()
    with torch.no_grad():
        q, k, v = (mha.split(p(x)) for p in (mha.q_proj, mha.k_proj, mha.v_proj))
        out, weights = transformer.scaled_dot_product_attention(q, k, v)
        final = mha.out_proj(out.transpose(1, 2).reshape(1, len(tokens), d_model))
    return {"tokens": tokens, "x": tuple(x.shape), "q": tuple(q.shape), "k": tuple(k.shape),
            "v": tuple(v.shape), "weights": weights[0, 0], "heads_out": tuple(out.shape),
            "out": tuple(final.shape), "d_k": mha.d_k}
