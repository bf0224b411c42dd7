"""Fill-mask: BERT's masked-word task, by a masked LM or approximated by a causal LM.

`fill(role, text, top_k, targets)` returns a `FillResult` (the role object's `fill_mask`:
`MaskedFill` for a `roles.MaskedLM`, `CausalFill` for a `roles.CausalLM`):
- `per_mask`: one list per mask of {"token_str", "score", "sequence"}, best first (the
  shape `transformers.pipeline("fill-mask")` returns, for any number of masks);
- `joint`: whole-sentence fills {"tokens", "score", "sequence"} ranked by joint probability
  (a small beam over the masks; the pipeline scores masks only one by one).

Masked-LM backend: scores are the model's softmax probabilities, as in the pipeline; several
masks are filled most-confident-first with a beam; a multi-token target word is scored over
all its tokens (chain rule, one batched forward), where the pipeline keeps only its first;
with target words, joint fills are scored the same way, masks left to right.

Causal-LM backend (the offline kit): candidates are the LM's likeliest next words after the
left context and after the left context in a fill-in-the-blank question that shows the whole
sentence (so the right context proposes words too), plus targets, each completed to a whole
word. Every candidate sentence is scored by its log-likelihood read left to right plus its
log-likelihood as the answer to that question; probabilities are renormalised over the
candidate sentences, and several masks are filled by a beam that keeps top_k words per mask
(per-mask scores are marginals over the joint fills). This is an approximation of BERT's
task, and the UI says so.
"""

import itertools
import math
import re
import weakref
from dataclasses import dataclass, field

import torch

from . import lm_scoring
from .errors import InputError
from .roles import require
from .text import clean_text, parse_words

MAX_MASKS = 5
MASK_SPELLINGS = r"\[mask\]|<mask>"
CAUSAL_CANDIDATES = 12      # next-token candidates considered per mask by the causal backend
MAX_TARGET_TOKENS = 16      # tokens per target word (the causal backend scores every one)
MAX_TARGET_WORK = 20000     # target tokens the causal backend may score per request (~20 s)
MAX_BEAM_WORK = 40000       # the causal backend's estimated work per request (~16 s)
WORD_EXTENSIONS = 2         # extra tokens a causal candidate may grow by to finish its word
RIGHT_CONTEXT = 6           # tokens after a candidate that take part in its score
BLANK = "___"               # how a mask is shown in the fill-in-the-blank proposal prompt
CLOZE_ASK = "Fill in the blank:"
_cloze_heads: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> head


@dataclass
class FillResult:
    per_mask: list                     # [[{"token_str", "score", "sequence"}, ...], ...]
    joint: list                        # [{"tokens": [...], "score", "sequence"}, ...]
    backend: str                       # "masked_lm" or "causal_lm"
    notices: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"per_mask": self.per_mask, "joint": self.joint, "backend": self.backend,
                "notices": self.notices}


def split_masks(text: str, mask_token: str | None = None) -> list:
    """The text around its masks: n masks give n + 1 segments. Accepts [MASK], [mask], <mask>
    and the model's own mask token."""
    pattern = MASK_SPELLINGS + (f"|{re.escape(mask_token)}" if mask_token else "")
    segments = re.split(pattern, text, flags=re.IGNORECASE)
    masks = len(segments) - 1
    if masks == 0:
        raise InputError("No mask found: write [MASK] where the missing word goes, "
                         "e.g. 'The capital of France is [MASK].'")
    if masks > MAX_MASKS:
        raise InputError(f"{masks} masks found; the limit is {MAX_MASKS}.")
    return segments


def join(segments: list, fills: list) -> str:
    out = segments[0]
    for fill, seg in zip(fills, segments[1:]):
        out += fill + seg
    return out


def fill(role, text, top_k: int = 5, targets=None, batched: bool = False) -> FillResult:
    """`batched`: the masked LM's forward may share a batch with concurrent requests
    (micro-batching when serving many users; results equal up to float rounding)."""
    fill_mask = require(role, "fill_mask", "fill masks")
    text = clean_text(text, "Text")
    try:
        top_k = int(float(top_k))          # NaN and inf raise too: "1e400", float("nan")
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"top_k must be a whole number, not {str(top_k)[:30]!r}.") from None
    if not 1 <= top_k <= 50:
        raise InputError(f"top_k must be between 1 and 50, not {top_k}.")
    return fill_mask(text, top_k, parse_words(targets), batched)


# ------------------------------------------------------------------ masked-LM backend

_word_masks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _whole_word_ids(tok, size: int | None = None) -> torch.Tensor:
    """(size,) bool: tokens that stand as words (not '##' pieces, specials or [unused]).
    Ids the tokenizer never produces (a model vocabulary padded past it) are excluded."""
    if tok not in _word_masks:
        names = tok.convert_ids_to_tokens(list(range(len(tok))))
        special = set(tok.all_special_ids)
        _word_masks[tok] = torch.tensor(
            [i not in special and not n.startswith("##") and not re.fullmatch(r"\[unused\d+\]", n)
             for i, n in enumerate(names)])
    allowed = _word_masks[tok]
    if size is not None and size != len(allowed):
        allowed = torch.cat([allowed, torch.zeros(max(0, size - len(allowed)), dtype=torch.bool)])
        allowed = allowed[:size]
    return allowed


class MaskedFill:
    """Fill-mask with a `roles.MaskedLM`, as transformers' pipeline: `preprocess` (ids, mask
    positions) -> the role's `forward` (batched across requests when serving) ->
    `postprocess` (top words, targets, joint fills)."""

    def __init__(self, role, batched: bool = False):
        self.role, self.tok, self.batched = role, role.tokenizer, batched
        self.max_len = role.max_length()

    def logits(self, rows: list, positions: list) -> torch.Tensor:
        return self.role.forward(rows, positions, self.batched)

    def encode(self, segments: list, notices: list) -> list:
        ids = self.tok(self.tok.mask_token.join(segments))["input_ids"]
        if len(ids) <= self.max_len:
            return ids
        # too long: keep a window of the text around the masks, with a notice
        positions = [i for i, t in enumerate(ids) if t == self.tok.mask_token_id]
        body, room = ids[1:-1], self.max_len - 2
        first, last = positions[0] - 1, positions[-1] - 1
        if last - first + 1 > room:
            raise InputError(f"The masks are {last - first + 1} tokens apart; they must fit in "
                             f"the model's context of {self.max_len} tokens.")
        start = max(0, min(first - (room - (last - first + 1)) // 2, len(body) - room))
        notices.append(f"The text is {len(ids)} tokens, over the model's {self.max_len}: only "
                       f"the {room} tokens around the mask(s) were used.")
        return ids[:1] + body[start:start + room] + ids[-1:]

    def fill(self, text: str, top_k: int, targets: list) -> FillResult:
        segments, ids, positions, notices = self.preprocess(text)
        logits = self.logits([ids], [positions])[0]                          # (M, V)
        return self.postprocess(segments, ids, positions, logits, top_k, targets, notices)

    def preprocess(self, text: str) -> tuple:
        """(segments around the masks, token ids, mask positions, notices)."""
        segments = split_masks(text, self.tok.mask_token)
        notices = []
        ids = self.encode(segments, notices)
        positions = [i for i, t in enumerate(ids) if t == self.tok.mask_token_id]
        return segments, ids, positions, notices

    def postprocess(self, segments, ids, positions, logits, top_k, targets, notices):
        """Top words (or target words) per mask, then joint fills (a beam that runs more
        forwards when there are several masks)."""
        probs = logits.softmax(-1)
        per_mask = []
        for m, pos in enumerate(positions):
            if targets:
                scored = self.target_scores(ids, pos, probs[m], targets)
            else:
                p = probs[m] * _whole_word_ids(self.tok, probs.shape[-1]).to(probs.device)
                values, idx = p.topk(top_k)
                scored = [(self.tok.decode([int(i)]).strip(), float(v)) for v, i in zip(values, idx)]
            others = [self.tok.mask_token] * len(positions)
            per_mask.append([{"token_str": w, "score": s,
                              "sequence": join(segments, others[:m] + [w] + others[m + 1:])}
                             for w, s in sorted(scored, key=lambda x: -x[1])[:top_k]])
        if len(positions) == 1:
            joint = [{"tokens": [r["token_str"]], "score": r["score"], "sequence": r["sequence"]}
                     for r in per_mask[0]]
        else:
            joint = self.joint(ids, positions, segments, top_k, targets)
        return FillResult(per_mask, joint, "masked_lm", notices)

    def target_scores(self, ids: list, pos: int, probs: torch.Tensor, targets: list) -> list:
        """P(word) at the mask for each target; multi-token words by the chain rule."""
        scored, rows, plan = [], [], []
        for word in targets:
            pieces = self.tok(word, add_special_tokens=False)["input_ids"]
            if not pieces:
                continue
            if len(pieces) == 1:
                scored.append((word, float(probs[pieces[0]])))
                continue
            # the one mask becomes len(pieces) masks, filled left to right
            base = ids[:pos] + [self.tok.mask_token_id] * len(pieces) + ids[pos + 1:]
            if len(base) > self.max_len:
                continue
            for j in range(len(pieces)):
                rows.append(base[:pos] + pieces[:j] + base[pos + j:])
                plan.append((word, pos + j, pieces[j]))
        if rows:
            logp = self.logits(rows, [[at] for _, at, _ in plan])[:, 0].log_softmax(-1)
            totals: dict = {}
            for r, (word, _, piece) in enumerate(plan):
                totals[word] = totals.get(word, 0.0) + float(logp[r, piece])
            scored += [(w, math.exp(t)) for w, t in totals.items()]
        if not scored:
            raise InputError("None of the target words can be written with this model's tokens.")
        return scored

    def joint(self, ids, positions, segments, top_k, targets) -> list:
        """Beam over the masks, most-confident mask first; ranked by joint probability."""
        if targets:
            return self.joint_targets(ids, segments, top_k, targets)
        width = max(top_k, 5)
        allowed = _whole_word_ids(self.tok, self.role.model.config.vocab_size)
        beams = [(0.0, list(ids), {})]          # (log P, ids, {mask index: token id})
        for _ in positions:
            logp = self.logits([b[1] for b in beams], [positions] * len(beams)).log_softmax(-1)
            logp = logp.masked_fill(~allowed.to(logp.device), -math.inf)
            grown = {}
            for b, (score, row, filled) in enumerate(beams):
                open_ = [m for m in range(len(positions)) if m not in filled]
                best = max(open_, key=lambda m: float(logp[b, m].max()))
                values, idx = logp[b, best].topk(width)
                for v, t in zip(values.tolist(), idx.tolist()):
                    if v == -math.inf:
                        continue
                    new = {**filled, best: t}
                    key = tuple(sorted(new.items()))
                    if key not in grown or grown[key][0] < score + v:
                        new_row = list(row)
                        new_row[positions[best]] = t
                        grown[key] = (score + v, new_row, new)
            beams = sorted(grown.values(), key=lambda x: -x[0])[:width]
        out = []
        for score, _, filled in beams[:top_k]:
            words = [self.tok.decode([filled[m]]).strip() for m in range(len(positions))]
            out.append({"tokens": words, "score": math.exp(score),
                        "sequence": join(segments, words)})
        return out

    def joint_targets(self, ids, segments, top_k, targets) -> list:
        """Joint fills from the target words only, multi-token words included: masks left to
        right, each word's tokens left to right (chain rule; the word's later tokens and
        the later masks still masked). Exact over every assignment when there are two masks
        (the beam keeps every word of the first); a beam beyond that."""
        pieces = {w: p for w in targets
                  if (p := self.tok(w, add_special_tokens=False)["input_ids"])}
        if not pieces:
            raise InputError("None of the target words can be written with this model's tokens.")
        width = max(top_k, 5, len(pieces))
        mask = self.tok.mask_token_id
        beams = [(0.0, list(ids), [])]          # (log P, ids so far, words so far)
        for _ in range(len(segments) - 1):
            rows, plan = [], []                 # plan[r] = (beam, word, position, token)
            for b, (_, row, _) in enumerate(beams):
                pos = row.index(mask)           # the first mask still open
                for word, p in pieces.items():
                    base = row[:pos] + [mask] * len(p) + row[pos + 1:]
                    if len(base) > self.max_len:
                        continue
                    for j in range(len(p)):
                        rows.append(base[:pos] + p[:j] + base[pos + j:])
                        plan.append((b, word, pos + j, p[j]))
            totals: dict = {}
            for start in range(0, len(rows), 64):         # bounded batches
                chunk = plan[start:start + 64]
                logp = self.logits(rows[start:start + 64],
                                   [[at] for _, _, at, _ in chunk])[:, 0].log_softmax(-1)
                for r, (b, word, _, token) in enumerate(chunk):
                    totals[b, word] = totals.get((b, word), 0.0) + float(logp[r, token])
            grown = []
            for (b, word), logp in totals.items():
                score, row, words = beams[b]
                pos = row.index(mask)
                grown.append((score + logp, row[:pos] + pieces[word] + row[pos + 1:],
                              words + [word]))
            if not grown:
                raise InputError("The target words do not fit in the model's context here.")
            beams = sorted(grown, key=lambda x: -x[0])[:width]
        return [{"tokens": words, "score": math.exp(score), "sequence": join(segments, words)}
                for score, _, words in beams[:top_k]]


# ------------------------------------------------------------------ causal-LM backend

class CausalFill:
    """BERT's task approximated by a `roles.CausalLM` (see the module's docstring).
    `scorer`: the role's micro-batcher, so candidates share forwards across requests."""

    def __init__(self, role, scorer=None):
        self.model, self.tok, self.scorer = role.scoring_model, role.tokenizer, scorer
        self.max_len = role.max_length()

    def candidates(self, prefix_text: str, right: str, rest: str, top_k: int,
                   targets: list) -> list:
        """[(word, score)] for one mask, best first.

        Proposals: the LM's likeliest next words after the left context, and after the same
        left context in a fill-in-the-blank question that shows the whole sentence first
        (`rest`: everything after this mask, later masks as blanks), so words only the right
        context suggests are proposed too ("[MASK] is the capital of France.").
        Score: log P(word + right | left) in the plain text plus log P(word + right | the
        question, left) as its answer: the second sees the right context before the word.
        Only the first RIGHT_CONTEXT tokens of `right` are scored: they carry nearly all
        the evidence about the missing word, and compute grows with every token.
        """
        right = self.tok.decode(lm_scoring.encode(self.tok, right)[:RIGHT_CONTEXT])
        core = prefix_text.rstrip()
        space = " " if (prefix_text != core and core) else ""
        # the plain text and the question run together: one forward, each row its own prefix
        head, tail = self.cloze_parts(prefix_text, rest, core)
        plain = [lm_scoring.start_id(self.tok)] + lm_scoring.encode(self.tok, core)
        prefix, cloze = lm_scoring.run_many(self.model, [(None, plain), (head, tail)],
                                            self.scorer)
        if targets:
            words = list(targets)
        else:
            n = max(CAUSAL_CANDIDATES, 2 * top_k)
            # the two sources' proposals in turn, n in all: scoring then costs what one
            # source's proposals did, and neither source can crowd the other out
            pairs = zip(self.next_words(prefix, bool(space), n),
                        self.next_words(cloze, bool(space), n))
            words = list(dict.fromkeys(w for pair in pairs for w in pair))[:n]
        scored = {}
        pending = words
        for round_ in range(WORD_EXTENSIONS + 1):
            conts = [lm_scoring.encode(self.tok, space + w + right) for w in pending]
            keep = [(w, c, self.word_end(space + w, c)) for w, c in zip(pending, conts) if c]
            # a product of two experts: the sentence read left to right, and the same words
            # as the answer to the blank, read after the whole sentence (one forward); the
            # first also gives the distribution right after each word (`at`), which decides
            # whether the word goes on
            both = lm_scoring.score_rows(self.model, [(prefix, c, at or len(c))
                                                      for _, c, at in keep] +
                                         [(cloze, c) for _, c, _ in keep], self.scorer)
            plain, asked = both[:len(keep)], both[len(keep):]
            totals = [a + b for (a, _), (b, _) in zip(plain, asked)]
            following = [f for _, f in plain]
            grown = []
            for (w, c, at), total, nxt in zip(keep, totals, following):
                scored[w] = max(total, scored.get(w, -math.inf))
                if not targets and round_ < WORD_EXTENSIONS and at:
                    grown += self.extensions(w, nxt, c, at)
            pending = [w for w in dict.fromkeys(grown) if w not in scored]
            if not pending:
                break
        return sorted(scored.items(), key=lambda x: -x[1])

    def cloze_parts(self, prefix_text: str, rest: str, core: str) -> tuple:
        """(Prefix of the fixed head, ids of the rest) of the prompt "fill in the blank:
        <sentence with blanks>" with the answer begun with the left context (a chat turn
        when the model has a chat template). The head (system turn, instruction) runs once
        per model."""
        sentence = f"{prefix_text}{BLANK}{rest}"
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": f"{CLOZE_ASK} {sentence}"}], tokenize=False,
                add_generation_prompt=True)
            cut = text.index(CLOZE_ASK) + len(CLOZE_ASK)
            head, tail = text[:cut], text[cut:] + core
            head_ids = lm_scoring.encode(self.tok, head)
        else:
            head_ids = [lm_scoring.start_id(self.tok)] + lm_scoring.encode(self.tok, CLOZE_ASK)
            tail = f" {sentence}\nAnswer: {core}"
        key = (id(self.tok), tuple(head_ids))
        cached = _cloze_heads.get(self.model)
        if cached is None or cached[0] != key:
            cached = (key, lm_scoring.run_ids(self.model, head_ids))
            _cloze_heads[self.model] = cached
        return cached[1], lm_scoring.encode(self.tok, tail)

    def next_words(self, prefix, spaced: bool, n: int) -> list:
        """The n likeliest next tokens that begin a word (after a space, if one precedes)."""
        strings = lm_scoring.token_strings(self.tok)
        words = []
        for tid in prefix.next_logp.topk(min(20 * n, prefix.next_logp.numel())).indices.tolist():
            s = strings[tid]
            body = s[1:] if spaced and s.startswith(" ") else (s if not spaced else "")
            if body[:1].isalnum() and body.strip() == body:
                words.append(body)
                if len(words) == n:
                    break
        return list(dict.fromkeys(words))

    def word_end(self, word: str, ids: list) -> int | None:
        """How many of `ids` (the word and the text after it) spell the word: the length of
        its own encoding when that begins `ids`, else None (the word's last token merges with
        what follows it, so no distribution comes right after the word)."""
        own = lm_scoring.encode(self.tok, word)
        return len(own) if own and ids[:len(own)] == own else None

    def extensions(self, word: str, next_logp: torch.Tensor, ids: list, at: int) -> list:
        """`word` grown by its likeliest next token, when that token continues the word and is
        likelier than what the text says comes next. `next_logp`: the distribution right
        after the word, whose tokens are ids[:at] of the word and the text after it."""
        strings = lm_scoring.token_strings(self.tok)
        tid = int(next_logp.argmax())
        piece = strings[tid]
        if not (piece[:1].isalpha() and piece.isalnum()):
            return []
        if at < len(ids) and float(next_logp[ids[at]]) >= float(next_logp[tid]):
            return []
        return [word + piece]

    def check_target_work(self, targets: list, masks: int, width: int) -> None:
        """Refuse, before any forward, targets this backend would spend minutes on: each is
        scored twice per beam at every mask (up to 2 x width beams after the first), and a
        public server's short lane must not run one request for minutes (4 masks x 100
        targets of 50 tokens took 487 s)."""
        sizes = [len(lm_scoring.encode(self.tok, " " + w)) for w in targets]
        for word, size in zip(targets, sizes):
            if size > MAX_TARGET_TOKENS:
                raise InputError(f"Target {word[:30]!r} is {size} tokens; a target is a word "
                                 f"or short phrase of at most {MAX_TARGET_TOKENS}.")
        work = 2 * sum(sizes) * (1 + (masks - 1) * 2 * width)
        if work > MAX_TARGET_WORK:
            raise InputError(f"{len(targets)} targets at {masks} masks would score about "
                             f"{work} tokens; the limit is {MAX_TARGET_WORK}. Use fewer "
                             f"targets or masks.")

    def check_beam_work(self, text_tokens: int, masks: int, width: int, top_k: int,
                        targets: list) -> None:
        """Refuse, before any forward, a beam this backend would spend minutes on: every
        beam after the first mask runs a round of its own (the text read twice, as plain
        text and as a question, then each proposed word with its right context, twice), so
        work grows with masks x width x the text's length. 5 masks at top-k 20 on a short
        sentence took 43 s on 2 cores; the same in a 10,000-character text, over 13
        minutes, while the short lane's one slot held every other user's search."""
        # one round at the first mask, at most `width` beams at the second, and up to
        # 2 x width after it (`_prune`)
        rounds = 1 + (width if masks > 1 else 0) + max(masks - 2, 0) * 2 * width
        words = len(targets) if targets else max(CAUSAL_CANDIDATES, 2 * top_k)
        # a round's two prefix rows are padded to ~2x the text, and attention grows with
        # its square (one mask in 1,959 tokens: 20 s; in 3,959: 73 s)
        text = 5 * text_tokens + text_tokens ** 2 // 100
        work = rounds * (text + 2 * words * (RIGHT_CONTEXT + 2))
        if work > MAX_BEAM_WORK:
            raise InputError(f"{masks} mask{'s' if masks > 1 else ''} at top-k {top_k} in a "
                             f"{text_tokens}-token text would take about {work} units of work; "
                             f"the limit is {MAX_BEAM_WORK} (~16 s here). Use fewer masks, a "
                             f"smaller top-k or a shorter text.")

    def fill(self, text: str, top_k: int, targets: list) -> FillResult:
        segments = split_masks(text, None)
        masks = len(segments) - 1
        notices = []
        total_tokens = len(lm_scoring.encode(self.tok, text))
        room = (self.max_len - 64) // 2     # the proposal prompt holds the text twice
        if total_tokens > room:
            raise InputError(f"The text is {total_tokens} tokens; this model reads at most "
                             f"{room} here.")
        width = max(top_k, 8) if masks > 1 else max(top_k, CAUSAL_CANDIDATES)
        self.check_target_work(targets, masks, width)
        self.check_beam_work(total_tokens, masks, width, top_k, targets)
        beams = [(0.0, segments[0], [])]      # (log P, text so far, words)
        for m in range(masks):
            right, rest = segments[m + 1], BLANK.join(segments[m + 1:])
            grown = []
            for score, so_far, words in beams:
                core = so_far.rstrip()
                space = " " if (so_far != core and core) else ""
                for w, lp in self.candidates(so_far, right, rest, top_k, targets)[:width]:
                    grown.append((score + lp, core + space + w + right, words + [w]))
            grown.sort(key=lambda x: -x[0])
            # the last mask keeps every candidate sentence: the per-mask marginals below
            # need top_k distinct words per mask
            beams = grown if m == masks - 1 else _prune(grown, width, top_k)
        # renormalise over the candidate sentences
        best = beams[0][0]
        weights = [math.exp(s - best) for s, _, _ in beams]
        norm = sum(weights)
        joint = [{"tokens": words, "score": w / norm, "sequence": sentence}
                 for w, (_, sentence, words) in zip(weights, beams)]
        per_mask = []
        for m in range(masks):
            marginal: dict = {}
            for j in joint:
                marginal[j["tokens"][m]] = marginal.get(j["tokens"][m], 0.0) + j["score"]
            ranked = sorted(marginal.items(), key=lambda x: -x[1])[:top_k]
            per_mask.append([{"token_str": w, "score": s,
                              "sequence": next(j["sequence"] for j in joint if j["tokens"][m] == w)}
                             for w, s in ranked])
        if masks > 1:
            notices.append("Several masks: per-mask scores are marginals over the joint fills.")
        return FillResult(per_mask, joint[:top_k], "causal_lm", notices)


def _prune(beams: list, width: int, top_k: int) -> list:
    """The `width` best beams (sorted best first), plus up to `width` more: the best beam of
    each of the top_k best words at every mask filled so far (taken in turn across masks),
    so each mask keeps top_k distinct words while compute stays within twice the beam."""
    keep = dict.fromkeys(range(min(width, len(beams))))
    firsts = []                                  # per mask: best beam of each word, best first
    for m in range(len(beams[0][2]) if beams else 0):
        seen: dict = {}
        for i, (_, _, words) in enumerate(beams):
            if len(seen) == top_k:
                break
            seen.setdefault(words[m], i)
        firsts.append([i for i in seen.values() if i not in keep])
    extra = [i for turn in itertools.zip_longest(*firsts) for i in turn if i is not None]
    keep.update(dict.fromkeys(extra[:width]))
    return [beams[i] for i in sorted(keep)]
