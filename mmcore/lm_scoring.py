"""Scoring text with a causal LM: log P(continuation | prefix), many continuations at once.

The prefix runs once; its KV cache is repeated across the batch of continuations, so scoring
N candidates costs one forward over their own tokens only (right-padded: under a causal mask,
padding after a sequence cannot change its scores).
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


@torch.inference_mode()
def score_continuations(model, prefix: Prefix, continuations: list, want_next: bool = False):
    """Total log P(c | prefix) for each token list c (each non-empty).

    With `want_next`, also returns each continuation's (V,) log-probabilities of the token
    that would follow it (used to extend partial words).
    """
    n = len(continuations)
    if n == 0:
        return ([], []) if want_next else []
    device = prefix.next_logp.device
    width = max(len(c) for c in continuations)
    ids = torch.zeros((n, width), dtype=torch.long, device=device)
    for row, cont in enumerate(continuations):
        ids[row, :len(cont)] = torch.tensor(cont, device=device)
    cache = copy.deepcopy(prefix.cache)
    cache.batch_repeat_interleave(n)
    logp = model(input_ids=ids, cache=cache, use_cache=True).logits.float()
    logp = logp.log_softmax(-1)                                            # (n, width, V)
    totals, following = [], []
    for row, cont in enumerate(continuations):
        total = prefix.next_logp[cont[0]]
        if len(cont) > 1:
            steps = torch.tensor(cont[1:], device=device)
            total = total + logp[row, torch.arange(len(cont) - 1, device=device), steps].sum()
        totals.append(float(total))
        if want_next:
            following.append(logp[row, len(cont) - 1])
    return (totals, following) if want_next else totals
