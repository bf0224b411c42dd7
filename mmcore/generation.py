"""Text generation with a causal LM: a lean decode loop, streaming, per-token probabilities.

The loop is ours rather than `model.generate`: one prefill with `logits_to_keep=1`, then one
forward per token on a KV cache, with no per-step processor objects. Greedy output is token
for token what `model.generate` gives (tested). Stopping is per request: a `threading.Event`
checked before every token, or simply closing the generator (Gradio's Stop does that); no
thread is ever started, so none can be left running.

Sampling follows transformers' order: repetition penalty, temperature, top-k, top-p.
"""

import random
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from . import lm_scoring
from .compiled import prefill
from .errors import InputError
from .text import clean_text

MAX_NEW_TOKENS = 1024
MAX_CANDIDATES = 8
TOP_ALTERNATIVES = 5


@dataclass
class SamplingParams:
    max_new_tokens: int = 64          # 1..MAX_NEW_TOKENS
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off; in (0, 1]
    repetition_penalty: float = 1.0   # 1 = off; > 0
    seed: int | None = None           # None: a fresh seed, reported back
    stop: tuple = ()                  # stop sequences (text); the output ends before them
    chat: bool | None = None          # None: use the chat template when the model has one

    def check(self) -> "SamplingParams":
        """TGI-style validation, on the server, with the numbers in the message."""
        def number(name, cast):
            value = getattr(self, name)
            try:
                value = cast(value)
            except (TypeError, ValueError, OverflowError):      # OverflowError: int(inf)
                raise InputError(f"{name} must be a finite number, not {value!r}.") from None
            if value != value:  # NaN
                raise InputError(f"{name} must be a number, not NaN.")
            setattr(self, name, value)
            return value

        if not 1 <= number("max_new_tokens", int) <= MAX_NEW_TOKENS:
            raise InputError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, "
                             f"not {self.max_new_tokens}.")
        if not 0 <= number("temperature", float) <= 100:
            raise InputError(f"temperature must be >= 0 (0 = greedy), not {self.temperature}.")
        if number("top_k", int) < 0:
            raise InputError(f"top_k must be >= 0 (0 = off), not {self.top_k}.")
        if not 0 < number("top_p", float) <= 1:
            raise InputError(f"top_p must be in (0, 1], not {self.top_p}.")
        if not 0 < number("repetition_penalty", float) <= 10:
            raise InputError(f"repetition_penalty must be in (0, 10], not "
                             f"{self.repetition_penalty}.")
        if self.seed is None or self.seed == "":
            self.seed = random.SystemRandom().randrange(2**31)
        self.seed = int(number("seed", int)) % 2**63
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop = tuple(clean_text(s, "Stop sequence", 200) for s in stops if s)
        if len(self.stop) > 8:
            raise InputError("At most 8 stop sequences.")
        return self


@dataclass
class TokenInfo:
    token_id: int
    text: str                 # this token's text in the output
    prob: float               # the model's probability of this token (before sampling filters)
    alternatives: list        # [(text, prob, token_id)] the TOP_ALTERNATIVES likeliest here
    forced: bool = False      # given by the caller (regenerate-from-here), not chosen


@dataclass
class Generation:
    """What one run produced; filled in as it streams."""
    params: SamplingParams
    prompt_tokens: int = 0
    tokens: list = field(default_factory=list)       # TokenInfo
    text: str = ""
    finish: str = ""                                 # "length", "eos", "stop" or "cancelled"
    ttft: float = 0.0                                # seconds to the first token
    seconds: float = 0.0
    notices: list = field(default_factory=list)
    # tokens decoded but not yet taken by the consumer when it took this one (a serving
    # scheduler's queue; 0 when decoding runs on the consumer's thread)
    behind: int = 0

    @property
    def tokens_per_second(self) -> float:
        decode = self.seconds - self.ttft
        return (len(self.tokens) - 1) / decode if len(self.tokens) > 1 and decode > 0 else 0.0


def use_chat(tok, chat) -> bool:
    return bool(getattr(tok, "chat_template", None)) if chat is None else bool(chat)


def prompt_ids(tok, prompt: str, chat: bool) -> list:
    if chat:
        if not getattr(tok, "chat_template", None):
            raise InputError("This model has no chat template; turn chat mode off.")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(prompt)["input_ids"]


def eos_ids(model, tok) -> set:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tok):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return {i for i in ids if i is not None}


def context_length(model) -> int:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024)


def _process(logits: torch.Tensor, seen: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(V,) logits -> (V,) logits after repetition penalty, temperature, top-k, top-p."""
    if p.repetition_penalty != 1.0 and seen.numel():
        picked = logits[seen]
        logits = logits.scatter(0, seen, torch.where(picked < 0, picked * p.repetition_penalty,
                                                     picked / p.repetition_penalty))
    if p.temperature == 0:
        return logits
    scaled = logits / p.temperature
    if p.temperature < 1 and bool((scaled == float("inf")).any()):
        # a tiny temperature (1e-37) overflows finite scores to infinity; the same
        # distribution from scores shifted to a maximum of 0 cannot overflow (a model's
        # own infinite or NaN score stays one, and `draw` refuses it). In float64: below
        # ~7e-46 a temperature is 0 in float32, and 0/0 is NaN
        scaled = ((logits.double() - logits.max()) / p.temperature).to(logits.dtype)
    logits = scaled
    n = logits.numel()
    if p.top_k > 0 or p.top_p < 1.0:
        # only the likeliest can be kept: top-k's survivors, or for top-p alone the
        # TOP_P_CANDIDATES likeliest when its cut lies among them (else every token)
        ordered, order = logits.topk(min(p.top_k if p.top_k > 0 else TOP_P_CANDIDATES, n))
        if p.top_k > 0 and len(ordered) < n:
            tied = logits >= ordered[-1]
            if int(tied.sum()) > len(ordered):          # ties with the k-th: all kept
                order = tied.nonzero().squeeze(1)
                ordered, by = logits[order].sort(descending=True)
                order = order[by]
        if p.top_p < 1.0:
            ordered, order = _top_p(logits, ordered, order, p.top_p, p.top_k > 0)
        out = torch.full_like(logits, float("-inf"))
        out[order] = ordered
        logits = out
    return logits


TOP_P_CANDIDATES = 256      # top-p alone first looks for its cut among this many tokens


def _top_p(logits: torch.Tensor, ordered: torch.Tensor, order: torch.Tensor, top_p: float,
           renormalise: bool) -> tuple:
    """(ordered, order) cut to the likeliest tokens whose probabilities first sum past
    `top_p` (the one that crosses included), in float64: the float32 running sum of 49,152
    probabilities drifts by about 1e-3 near 1, as much as 1 - 0.999. `ordered`: the
    likeliest logits, descending; after top-k (`renormalise`) they are all that is left,
    else the cut must lie among them or every token is sorted (a full sort of SmolLM2's
    vocabulary cost 4.3 ms a token)."""
    if renormalise:
        cumulative = ordered.double().softmax(-1).cumsum(-1)
    else:
        total = torch.logsumexp(logits.double(), -1)
        cumulative = (ordered.double() - total).exp().cumsum(-1)
        if len(ordered) < logits.numel() and not bool(cumulative[-1] > top_p):
            ordered, order = logits.sort(descending=True)       # the cut lies further down
            cumulative = (ordered.double() - total).exp().cumsum(-1)
    drop = cumulative >= top_p          # as transformers: mass above a token >= top_p: out
    drop[1:] = drop[:-1].clone()        # keep the token that crosses top_p
    drop[0] = False
    return ordered[~drop], order[~drop]


def draw(logits: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn from softmax(`logits`) with one uniform number through the float64
    cumulative distribution. `torch.multinomial` draws a random number per entry: 1.25 ms
    a token over SmolLM2's 49,152, ~10% of a fast decode step. -inf entries are never
    drawn."""
    probs = logits.softmax(-1)
    cdf = probs.cumsum(-1, dtype=torch.float64)
    if not bool(torch.isfinite(cdf[-1])):          # NaN or +inf logits: a broken model
        raise InputError("The model's scores for the next token are not finite numbers "
                         "(NaN or infinity); it cannot be sampled.")
    u = torch.rand((), generator=generator, device=generator.device, dtype=torch.float64)
    token = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    if token >= probs.numel() or not bool(probs[token] > 0):   # u * total rounded up to total
        token = int(torch.nonzero(probs).max())
    return token


def _alternatives(strings: list, probs: torch.Tensor) -> list:
    values, idx = probs.topk(TOP_ALTERNATIVES)
    return [(strings[i] if i < len(strings) else "", v, i)
            for v, i in zip(values.tolist(), idx.tolist())]


class _Detokenizer:
    """Incremental decoding in O(1) per token, equal to `tok.decode` of the same ids.

    Fast tokenizers use `tokenizers`' DecodeStream; others decode a short window and emit
    what it adds (TGI's method), holding back while a multi-byte character is incomplete.
    Both start from a window of the prompt's last tokens: a SentencePiece (Llama) token such
    as "▁Paris" only keeps its leading space when something comes before it.
    """

    WINDOW = 5

    def __init__(self, tok, prompt: list | tuple = (), use_stream: bool = True):
        self.tok = tok
        self.window = list(prompt)[-self.WINDOW:]
        self.ids = list(self.window)
        self.prefix, self.read = 0, len(self.ids)
        self.emitted = ""
        backend = getattr(tok, "backend_tokenizer", None) if use_stream else None
        self.stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self.backend = backend
            self.stream = DecodeStream(self.window, skip_special_tokens=True)

    def _decode(self, ids: list) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self.stream is not None:
            piece = self.stream.step(self.backend, token) or ""
        else:
            before = self._decode(self.ids[self.prefix:self.read])
            after = self._decode(self.ids[self.prefix:])
            piece = ""
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.prefix, self.read = self.read, len(self.ids)
                piece = after[len(before):]
        self.emitted += piece
        return piece

    def flush(self) -> str:
        """What is still held back (e.g. an incomplete character at the end), once, at the end."""
        whole, head = self._decode(self.ids), self._decode(self.window)
        done = head + self.emitted
        rest = whole[len(done):] if whole.startswith(done) else ""
        self.emitted += rest
        return rest


def _find_stop(text: str, stops: tuple, start: int, min_end: int) -> int:
    """Where the first stop sequence begins in text[start:] among those ending after
    `min_end` (stops inside forced text do not count), or -1."""
    best = -1
    for s in stops:
        i = text.find(s, start)
        while i >= 0 and i + len(s) <= min_end:
            i = text.find(s, i + 1)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


def _held_back(text: str, stops: tuple) -> int:
    """How many characters at the end of `text` could still grow into a stop sequence."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])), default=0)


class TokenText:
    """What a caller sees of a run's tokens, one per run: each token's text piece (decoded
    incrementally), stop sequences cut (never inside forced text), `shown` (the text safe to
    show so far: a tail that could still grow into a stop sequence is held back), and the
    held-back bytes flushed at the end. `generate_tokens` and the serving scheduler both use
    it, so batched and unbatched runs show the same text."""

    def __init__(self, tok, prompt_ids: list, stops: tuple):
        self.detok = _Detokenizer(tok, prompt_ids)
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text, self.shown, self.forced_end = "", "", 0

    def add(self, info: TokenInfo) -> bool:
        """Fill in `info.text`; True when a stop sequence ends the run here."""
        piece = self.detok.push(info.token_id)
        info.text = piece
        self.text += piece
        if info.forced:
            self.forced_end = len(self.text)
        else:
            # a stop sequence may straddle tokens: look in the tail that could hold a new one
            hit = _find_stop(self.text, self.stops,
                             max(0, len(self.text) - len(piece) - self.longest + 1),
                             self.forced_end)
            if hit >= 0:
                info.text = piece[:max(0, hit - (len(self.text) - len(piece)))]
                self.shown = self.text[:hit]
                return True
        self.shown = self.text[:len(self.text) - _held_back(self.text, self.stops)]
        return False

    def finish(self, last: TokenInfo | None) -> None:
        """The run ended without a stop sequence: show everything, with any bytes the
        detokenizer still held (e.g. an incomplete character) added to the last token."""
        tail = self.detok.flush()
        if tail and last is not None:
            last.text += tail
            self.text += tail
        self.shown = self.text


def text_pieces(run: "Generation", tokens):
    """Text pieces of `run` as its token generator fills it in: what became safe to show
    after each token, then the rest at the end."""
    shown = 0
    for _ in tokens:
        if len(run.text) > shown:
            yield run.text[shown:]
            shown = len(run.text)
    if len(run.text) > shown:
        yield run.text[shown:]


@torch.inference_mode()
def generate_tokens(model, tok, prompt, params: SamplingParams, stop_event=None,
                    forced: list | None = None, run: Generation | None = None,
                    compiled=None):
    """Yield a TokenInfo per token as it is produced; `run` (if given) is filled in.

    `forced`: token ids placed after the prompt first (e.g. the tokens before a point the
    user picked, then the alternative chosen there); they are reported with their
    probabilities, then generation goes on from them.

    `run.text` is the text safe to show so far: it holds back a tail that could still grow
    into a stop sequence, and is the whole output once the generator is exhausted.

    `compiled`: the model's `compiled.CompiledDecode`; when its step for this length is
    ready, the tokens after the prefill are decoded by it on a static cache.
    """
    prompt = clean_text(prompt, "Prompt")
    params = params.check()
    run = run if run is not None else Generation(params)
    run.params = params
    ids = prompt_ids(tok, prompt, use_chat(tok, params.chat))
    forced = [int(t) for t in (forced or [])]
    limit = context_length(model)
    run.prompt_tokens = len(ids)
    if len(ids) + len(forced) + params.max_new_tokens > limit:
        raise InputError(f"inputs ({len(ids) + len(forced)} tokens) + max_new_tokens "
                         f"({params.max_new_tokens}) must be <= {limit}, the model's context.")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(params.seed)
    eos = eos_ids(model, tok)
    strings = lm_scoring.token_strings(tok)
    shown = TokenText(tok, ids, params.stop)
    start = time.perf_counter()
    length = len(ids) + len(forced)
    # one prefill over prompt + forced; row j of `rows` predicts the token after forced[:j]
    rows, cache, step_fn = prefill(model, compiled, torch.tensor([ids + forced], device=device),
                                   length + params.max_new_tokens, len(forced) + 1)
    generated: list = []
    for step in range(len(forced) + params.max_new_tokens):
        if stop_event is not None and stop_event.is_set():
            run.finish = "cancelled"
            break
        row = rows[step].float() if step <= len(forced) else logits[0].float()
        probs = row.softmax(-1)
        if step < len(forced):
            token, is_forced = forced[step], True
        else:
            seen = torch.tensor(ids + generated, device=device) \
                if params.repetition_penalty != 1.0 else None
            final = _process(row, seen, params)
            if params.temperature == 0:
                token = int(final.argmax())
            else:
                token = draw(final, generator)
            is_forced = False
        generated.append(token)
        if not run.tokens:
            run.ttft = time.perf_counter() - start
        if token in eos and not is_forced:
            run.finish = "eos"
            break
        info = TokenInfo(token, "", float(probs[token]), _alternatives(strings, probs),
                         is_forced)
        stopped = shown.add(info)
        run.tokens.append(info)
        run.text = shown.shown
        if stopped:
            run.finish = "stop"
            yield info
            break
        yield info
        if step + 1 >= len(forced) and len(generated) - len(forced) >= params.max_new_tokens:
            run.finish = "length"
            break
        if step >= len(forced):
            # the prefill already holds every forced token: feed only tokens chosen here
            feed = torch.tensor([[token]], device=device)
            if step_fn is not None:
                logits = step_fn(feed, torch.tensor([length], device=device), cache)
                length += 1
            else:
                logits = model(input_ids=feed, cache=cache, use_cache=True).logits[0]
    if run.finish != "stop":
        shown.finish(run.tokens[-1] if run.tokens else None)
        run.text = shown.shown
    run.finish = run.finish or "length"
    run.seconds = time.perf_counter() - start


def generate(model, tok, prompt, params: SamplingParams, num_candidates: int = 1,
             compiled=None):
    """The continuation (str), or a list of `num_candidates` of them (seeds seed, seed+1...)."""
    n = int(num_candidates)
    if not 1 <= n <= MAX_CANDIDATES:
        raise InputError(f"num_candidates must be between 1 and {MAX_CANDIDATES}, not {n}.")
    params = params.check()
    outs = []
    for i in range(n):
        run = Generation(params)
        p = SamplingParams(**{**asdict(params), "seed": params.seed + i})
        for _ in generate_tokens(model, tok, prompt, p, run=run, compiled=compiled):
            pass
        outs.append(run.text)
    return outs[0] if n == 1 else outs


def stream(model, tok, prompt, params: SamplingParams, stop_event: threading.Event | None = None,
           compiled=None):
    """Text pieces as they are generated; never a piece of a stop sequence (text that could
    still become one is held back until it cannot)."""
    run = Generation(params)
    yield from text_pieces(run, generate_tokens(model, tok, prompt, params, stop_event, run=run,
                                                compiled=compiled))
