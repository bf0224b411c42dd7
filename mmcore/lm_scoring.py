"""Scoring text with a causal LM: log P(continuation | prefix), many continuations at once.

The prefix runs once; its KV cache is repeated across the batch of continuations, so scoring
N candidates costs one forward over their own tokens only (right-padded: under a causal mask,
padding after a sequence cannot change its scores).

When serving many users, a `batcher` (a MicroBatcher of `score_rows`, see
`roles.CausalLM.scorer`) shares the forward with other requests' candidates, other prefixes
too: their prefix caches are left-padded to one width, each row with its own attention mask
and position ids, so a row reads the same keys at the same positions as alone (as
serving.Scheduler does).
"""

import copy
import weakref
from dataclasses import dataclass

import torch

_vocab_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_strings(tokenizer) -> list:
    """Every token id decoded on its own (e.g. " Paris"), computed once per tokenizer."""
    if tokenizer not in _vocab_cache:
        size = len(tokenizer)
        _vocab_cache[tokenizer] = tokenizer.batch_decode([[i] for i in range(size)])
    return _vocab_cache[tokenizer]


def start_id(tokenizer) -> int:
    """The token a text is scored after, so its first token has a probability too.

    The document separator `<|endoftext|>` where the vocabulary has one (GPT-2, SmolLM2:
    an instruct model's BOS is its chat-turn marker, a poor start for plain text), else
    BOS, else EOS.
    """
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(sep, int) and tokenizer.convert_ids_to_tokens(sep) == "<|endoftext|>":
        return sep
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return tid
    return 0


def encode(tokenizer, text: str) -> list:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


@dataclass
class Prefix:
    """A prefix run through the model: its KV cache and next-token log-probabilities."""
    cache: object
    next_logp: torch.Tensor   # (V,) log P(next token | prefix)
    length: int


def run_prefix(model, tokenizer, text: str) -> Prefix:
    """`text` after the start token (so its first token is scored too)."""
    return run_ids(model, [start_id(tokenizer)] + encode(tokenizer, text))


@torch.inference_mode()
def run_ids(model, ids: list, after: Prefix | None = None) -> Prefix:
    """`ids` run through the model, after the prefix `after` if given (its cache is copied,
    never changed, so a fixed prompt head is computed once and reused)."""
    device = next(model.parameters()).device
    cache = copy.deepcopy(after.cache) if after is not None else None
    out = model(input_ids=torch.tensor([ids], device=device), cache=cache, use_cache=True)
    start = after.length if after is not None else 0
    return Prefix(out.cache, out.logits[0, -1].float().log_softmax(-1), start + len(ids))


def score_continuations(model, prefix: Prefix, continuations: list, want_next: bool = False,
                        batcher=None):
    """Total log P(c | prefix) for each token list c (each non-empty).

    With `want_next`, also returns each continuation's (V,) log-probabilities of the token
    that would follow it (used to extend partial words). With `batcher` (a MicroBatcher of
    `score_rows` on this model), the forward is shared with concurrent requests.
    """
    if not continuations:
        return ([], []) if want_next else []
    rows = [(prefix, list(c)) for c in continuations]
    scored = batcher(rows) if batcher is not None else score_rows(model, rows)
    totals = [t for t, _ in scored]
    return (totals, [f for _, f in scored]) if want_next else totals


@torch.inference_mode()
def score_rows(model, rows: list) -> list:
    """[(prefix, continuation)] -> [(log P(c | prefix), (V,) log P(next token | prefix, c))],
    one forward for all rows (their prefixes may differ)."""
    device = rows[0][0].next_logp.device
    width = max(len(c) for _, c in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for r, (_, cont) in enumerate(rows):
        ids[r, :len(cont)] = torch.tensor(cont, device=device)
    prefixes = list({id(p): p for p, _ in rows}.values())
    if len(prefixes) == 1:                     # one request: its cache repeated, no mask
        cache = copy.deepcopy(prefixes[0].cache)
        cache.batch_repeat_interleave(len(rows))
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits
    else:
        logits = _padded_forward(model, rows, ids)
    out = []
    for r, (prefix, cont) in enumerate(rows):
        logp = logits[r, :len(cont)].float().log_softmax(-1)              # (len(c), V)
        total = prefix.next_logp[cont[0]]
        if len(cont) > 1:
            steps = torch.tensor(cont[1:], device=device)
            total = total + logp[torch.arange(len(cont) - 1, device=device), steps].sum()
        out.append((float(total), logp[-1]))
    return out


def _padded_forward(model, rows: list, ids: torch.Tensor) -> torch.Tensor:
    """Rows of different prefixes: caches left-padded to one width, masked, positioned."""
    from transformers import DynamicCache

    from .serving import _pad_left

    longest = max(p.length for p, _ in rows)
    layers = []
    for layer in range(len(rows[0][0].cache.layers)):
        keys = [_pad_left(p.cache.layers[layer].keys, longest) for p, _ in rows]
        values = [_pad_left(p.cache.layers[layer].values, longest) for p, _ in rows]
        layers.append((torch.cat(keys), torch.cat(values)))
    cache = DynamicCache(ddp_cache_data=layers)
    mask = torch.zeros((len(rows), longest + ids.shape[1]), dtype=torch.long, device=ids.device)
    for r, (p, _) in enumerate(rows):
        mask[r, longest - p.length:] = 1
    lengths = torch.tensor([p.length for p, _ in rows], device=ids.device)
    positions = lengths[:, None] + torch.arange(ids.shape[1], device=ids.device)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                 use_cache=True).logits

