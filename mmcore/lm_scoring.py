"""Scoring text with a causal LM: log P(continuation | prefix), many continuations at once.

A prefix runs once (`run_prefix`, `run_ids`, `run_many`: several prefixes in one forward,
left-padded, each with its own mask and positions). Continuations after prefixes
(`score_continuations`, `score_rows`) score in one forward of one sequence per prefix: the
prefix's cache once, then every continuation's tokens side by side, each seeing the prefix
and its own earlier tokens (a tree attention mask), so N candidates cost their own tokens
and no copies of the prefix's cache.

When serving many users, a `batcher` (a MicroBatcher of `run_rows`, see
`roles.CausalLM.scorer`) shares prefix runs and candidate scoring with other requests', other
prefixes too, so a row reads the same keys at the same positions as alone (as
serving.Scheduler does).
"""

import copy
import weakref
from dataclasses import dataclass

import torch

from .errors import InputError
from .gqa import NAME as GROUPED_SDPA

_vocab_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
TREE_TOKENS = 512        # continuation tokens per scoring sequence (the mask grows with its square)


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


def run_prefix(model, tokenizer, text: str, batcher=None) -> Prefix:
    """`text` after the start token (so its first token is scored too)."""
    return run_ids(model, [start_id(tokenizer)] + encode(tokenizer, text), batcher=batcher)


def run_ids(model, ids: list, after: Prefix | None = None, batcher=None) -> Prefix:
    """`ids` run through the model, after the prefix `after` if given (its cache is copied,
    never changed, so a fixed prompt head is computed once and reused). With `batcher`, the
    forward is shared with concurrent requests."""
    row = [(after, list(ids), "run")]
    return (batcher(row) if batcher is not None else run_rows(model, row))[0]


def score_continuations(model, prefix: Prefix, continuations: list, want_next: bool = False,
                        batcher=None):
    """Total log P(c | prefix) for each token list c (each non-empty).

    With `want_next`, also returns each continuation's (V,) log-probabilities of the token
    that would follow it. With `batcher` (a MicroBatcher of `run_rows` on this model), the
    forward is shared with concurrent requests.
    """
    if not continuations:
        return ([], []) if want_next else []
    scored = score_rows(model, [(prefix, c) for c in continuations], batcher)
    totals = [t for t, _ in scored]
    return (totals, [f for _, f in scored]) if want_next else totals


def score_rows(model, items: list, batcher=None) -> list:
    """[(prefix, continuation[, at])], prefixes free to differ -> [(log P(c | prefix), (V,)
    log P(next token | prefix, c[:at]))], in one forward (one sequence per prefix:
    `_tree_scores`). `at` defaults to len(c): the distribution after the whole
    continuation; a smaller one gives it after its first `at` tokens (e.g. after a word,
    before the text that follows it), from the same forward."""
    rows = [(item[0], list(item[1]), "score", *item[2:]) for item in items]
    return batcher(rows) if batcher is not None else run_rows(model, rows)


def run_many(model, items: list, batcher=None) -> list:
    """[(after: Prefix | None, ids)] -> their Prefixes, in one forward."""
    rows = [(after, list(ids), "run") for after, ids in items]
    return batcher(rows) if batcher is not None else run_rows(model, rows)


def run_rows(model, rows: list) -> list:
    """Rows (after: Prefix | None, ids, kind[, at]), of one request or several, in one
    forward per kind. Per row, kind "run": the Prefix after `ids`; kind "score" (`after`
    given, and `at`): (log P(ids | after), (V,) log P(next token | after, ids[:at]))."""
    out: list = [None] * len(rows)
    for kind in ("run", "score"):
        picked = [r for r, row in enumerate(rows) if row[2] == kind]
        if picked:
            for r, result in zip(picked, _forward(model, [rows[r] for r in picked])):
                out[r] = result
    return out


@torch.inference_mode()
def _forward(model, rows: list) -> list:
    """Rows of one kind. "score": `_tree_scores`. "run": ids right-padded; one `after`
    shared by all rows is repeated as is, several are left-padded to one width, masked and
    positioned."""
    device = next(model.parameters()).device
    if rows[0][2] == "score":
        return _tree_scores(model, rows, device)
    width = max(len(ids) for _, ids, _ in rows)
    x = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for r, (_, ids, _) in enumerate(rows):
        x[r, :len(ids)] = torch.tensor(ids, device=device)
    afters = list({id(a): a for a, _, _ in rows}.values())
    longest = max((a.length for a in afters if a is not None), default=0)
    # the head on each row's last token only
    keep = {"logits_to_keep": torch.tensor([[len(ids) - 1] for _, ids, _ in rows],
                                           device=device)}
    if len(afters) == 1:                      # one request: no padding before, no mask
        cache = None if afters[0] is None else copy.deepcopy(afters[0].cache)
        if cache is not None and len(rows) > 1:
            cache.batch_repeat_interleave(len(rows))
        out = model(input_ids=x, cache=cache, use_cache=True, **keep)
    else:
        out = _padded_forward(model, rows, x, longest, keep)
    return [_cut(out, r, after, ids, longest) for r, (after, ids, _) in enumerate(rows)]


def _tree_scores(model, rows: list, device) -> list:
    """Each row's `_scored` result from its logits after its prefix, in one sequence per
    distinct prefix: the prefix's cache once (left-padded to the longest), then the tokens
    of all its rows side by side, each token seeing the prefix and its own row's earlier
    tokens (a 4D mask; positions go on from the prefix's length). Twelve candidates after
    two prefixes cost the cache of two rows, not twelve copies of each (measured on the
    offline fill-mask: the copies were half the scoring forward). A sequence holds at most
    TREE_TOKENS tokens (more rows start another) and a forward at most TREE_TOKENS, so the
    mask and the logits (V floats per token: 100 MB for SmolLM2 at 512) stay bounded."""
    implementation = getattr(model.config, "_attn_implementation", "eager")
    if implementation not in ("sdpa", "eager", GROUPED_SDPA):
        raise InputError(f"Scoring text needs sdpa or eager attention (a 4D mask); this "
                         f"model runs {implementation}.")
    prefixes, used, spans = [], [], []       # per sequence: its prefix, its tokens so far
    for after, ids, *_ in rows:              # per row: (sequence, start)
        g = next((j for j in range(len(prefixes)) if prefixes[j] is after
                  and used[j] + len(ids) <= TREE_TOKENS), None)
        if g is None:                        # a new sequence
            g = len(prefixes)
            prefixes.append(after)
            used.append(0)
        spans.append((g, used[g]))
        used[g] += len(ids)
    groups = [[]]                            # sequences per forward
    for g in range(len(prefixes)):
        if groups[-1] and (len(groups[-1]) + 1) * max(used[j] for j in groups[-1] + [g]) \
                > TREE_TOKENS:
            groups.append([])
        groups[-1].append(g)
    scored = {}
    for group in groups:                     # each forward's logits freed before the next
        members = [(r, g - group[0]) for r, (g, _) in enumerate(spans) if g in group]
        out = _tree_forward(model, [prefixes[g] for g in group], [used[g] for g in group],
                            [(rows[r], (b, spans[r][1])) for r, b in members], implementation,
                            device)
        for (r, _), logits in zip(members, out):
            ids = rows[r][1]
            scored[r] = _scored(rows[r][0], ids, logits, rows[r][3] if len(rows[r]) > 3
                                else len(ids))
        del out, logits
    return [scored[r] for r in range(len(rows))]


def _tree_forward(model, prefixes: list, used: list, placed: list, implementation: str,
                  device) -> list:
    """One forward of len(prefixes) tree sequences; `placed`: [(row, (sequence, start))]."""
    longest, width = max(a.length for a in prefixes), max(used)
    x = torch.zeros((len(prefixes), width), dtype=torch.long, device=device)
    positions = torch.zeros_like(x)
    seen = torch.zeros((len(prefixes), 1, width, longest + width), dtype=torch.bool,
                       device=device)
    for g, after in enumerate(prefixes):
        seen[g, 0, :, longest - after.length:longest] = True
        seen[g, 0, used[g]:, longest + used[g]:].fill_diagonal_(True)   # padding: itself
    for (after, ids, *_), (g, start) in placed:
        n, end = len(ids), start + len(ids)
        x[g, start:end] = torch.tensor(ids, device=device)
        positions[g, start:end] = torch.arange(after.length, after.length + n, device=device)
        seen[g, 0, start:end, longest + start:longest + end] = torch.ones(
            n, n, dtype=torch.bool, device=device).tril()
    mask = seen
    if implementation == "eager":                                         # additive
        dtype = model.get_input_embeddings().weight.dtype
        mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(
            ~seen, torch.finfo(dtype).min)
    out = model(input_ids=x, attention_mask=mask, position_ids=positions,
                cache=_padded_cache(prefixes, longest), use_cache=True)
    return [out.logits[g, start:start + len(ids)] for (_, ids, *_), (g, start) in placed]


def _scored(prefix: Prefix, cont: list, logits: torch.Tensor, at: int) -> tuple:
    """(log P(cont | prefix), (V,) log P(next token | prefix, cont[:at]))."""
    logp = logits[:len(cont)].float().log_softmax(-1)                       # (len(c), V)
    total = prefix.next_logp[cont[0]]
    if len(cont) > 1:
        steps = torch.tensor(cont[1:], device=logp.device)
        total = total + logp[torch.arange(len(cont) - 1, device=logp.device), steps].sum()
    following = prefix.next_logp if at == 0 else logp[at - 1].clone()   # .clone(): not a
    return float(total), following              # view keeping all len(c) rows alive


def _cut(out, r: int, after: Prefix | None, ids: list, longest: int) -> Prefix:
    """Row r's own Prefix out of a batched forward (its cache without any padding)."""
    from transformers import DynamicCache

    start = after.length if after is not None else 0
    kept = -1 if out.logits.shape[1] == 1 else len(ids) - 1     # a model ignoring the keep
    next_logp = out.logits[r, kept].float().log_softmax(-1)     # its last token's
    if out.logits.shape[0] == 1:
        return Prefix(out.cache, next_logp, start + len(ids))
    lo, hi = longest - start, longest + len(ids)     # its prefix and its ids, no padding
    layers = [(layer.keys[r:r + 1, :, lo:hi].clone(), layer.values[r:r + 1, :, lo:hi].clone())
              for layer in out.cache.layers]
    return Prefix(DynamicCache(ddp_cache_data=layers), next_logp, start + len(ids))


def _padded_forward(model, rows: list, x: torch.Tensor, longest: int, keep: dict):
    """Rows after different prefixes: their caches left-padded to `longest`, masked, and
    each row's positions counted from its own prefix's length."""
    cache = _padded_cache([a for a, _, _ in rows], longest)
    lengths = [a.length if a is not None else 0 for a, _, _ in rows]
    mask = torch.zeros((len(rows), longest + x.shape[1]), dtype=torch.long, device=x.device)
    for r, length in enumerate(lengths):
        mask[r, longest - length:] = 1
    positions = torch.tensor(lengths, device=x.device)[:, None] + \
        torch.arange(x.shape[1], device=x.device)
    return model(input_ids=x, attention_mask=mask, position_ids=positions, cache=cache,
                 use_cache=True, **keep)


def _padded_cache(afters: list, longest: int):
    """One DynamicCache row per entry of `afters` (Prefix or None): its keys and values
    left-padded to `longest` (all padding for None)."""
    from transformers import DynamicCache

    like = next(a for a in afters if a is not None).cache.layers
    return DynamicCache(ddp_cache_data=[
        tuple(torch.cat([_part(a, i, name, layer, longest) for a in afters])
              for name in ("keys", "values")) for i, layer in enumerate(like)])


def _part(after, layer: int, name: str, like, longest: int) -> torch.Tensor:
    """A row's keys or values of one layer, left-padded to `longest` (all padding when the
    row has no prefix)."""
    from .serving import _pad_left

    if after is None:
        return like.keys.new_zeros(getattr(like, name).shape[:2] + (longest,) +
                                   getattr(like, name).shape[3:])
    return _pad_left(getattr(after.cache.layers[layer], name), longest)
