"""Typed role objects: what a loaded model does for the tasks.

A loader (`loaders.LOADERS`) returns one of these per role; a `Kit` holds one per role and
the tasks call their methods, never reaching into dicts of parts or dispatching on names:

- `CausalLM`: generate / stream / generate_tokens (through its continuous-batching
  scheduler when the kit serves many users), plus the scoring the offline kit uses to
  approximate BERT's tasks (`fill_mask`, `next_sentence`);
- `MaskedLM`: fill-mask with a masked LM's own head; `forward` (logits at the mask
  positions of a batch of rows) is the step concurrent requests share;
- `NSPHead`: next-sentence prediction with BERT's own head (preprocess -> forward ->
  postprocess, so a batch of pairs runs in one forward);
- `DualEncoder` (`dual_encoder.py`): encode_images / encode_texts.

A role any of them lacks is refused with a clear message by the task. Each object owns its
model, its tokenizer, its name and `precision`: the weight form it runs, in words.
"""

import threading

import torch

from . import generation
from .dual_encoder import DualEncoder
from .errors import InputError

__all__ = ["CausalLM", "MaskedLM", "NSPHead", "DualEncoder", "TextRole"]


class TextRole:
    """A Hugging Face text model and its tokenizer, serving one role."""

    def __init__(self, model, tokenizer, name: str, precision: str = "exact (fp32)"):
        self.model, self.tokenizer, self.name, self.precision = model, tokenizer, name, precision

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def max_length(self) -> int:
        """Tokens the model reads at most (its positions, or the tokenizer's limit)."""
        cfg = self.model.config
        positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions",
                                                                             1024)
        return min(positions, self.tokenizer.model_max_length or 10**9)

    def attention_target(self) -> tuple:
        """(module owning the attention setting, sub-module to run ("" = all), tokenizer)."""
        return self.model, "", self.tokenizer

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.precision})"

    FAST = ""           # the mmcore.precision function that converts this role's model

    @classmethod
    def make_fast(cls, model) -> str:
        """Convert `model` in place for "fast" precision; returns the form it now runs in."""
        from . import precision

        return getattr(precision, cls.FAST)(model)


def _long(steps):
    """Iterate `steps` as long work (`lanes.PRIORITY.long`), from its first step to its end
    or close."""
    from .lanes import PRIORITY

    with PRIORITY.long():
        yield from steps


class CausalLM(TextRole):
    """Left-to-right generation; also plays masked_lm and next_sentence on the offline kit."""

    def __init__(self, model, tokenizer, name: str, precision: str = "exact (fp32)"):
        super().__init__(model, tokenizer, name, precision)
        self._scheduler = None
        self._scorer = None
        self._compiled = None
        self._guard = threading.Lock()

    # plain decoding (not a scheduler's) is long work: a scheduler of another model keeps
    # to its own threads meanwhile (lanes.PRIORITY)
    def generate(self, prompt, params, num_candidates: int = 1):
        from .lanes import PRIORITY

        with PRIORITY.long():
            return generation.generate(self.model, self.tokenizer, prompt, params,
                                       num_candidates, self.compiled())

    def stream(self, prompt, params, stop_event=None):
        return _long(generation.stream(self.model, self.tokenizer, prompt, params, stop_event,
                                       self.compiled()))

    def generate_tokens(self, prompt, params, stop_event=None, forced=None, run=None,
                        pace=None):
        # `pace` (Kit.generate_tokens) is for a scheduler's consumers: decoding here runs on
        # the caller's thread
        return _long(generation.generate_tokens(self.model, self.tokenizer, prompt, params,
                                                stop_event, forced, run, self.compiled()))

    def compiled(self):
        """This model's compiled decode steps (`compiled.CompiledDecode`, made on first use;
        each length bucket compiles in the background on first demand), or None where
        compiling is off (unless MMCORE_COMPILE=1, with a C++ compiler for inductor)."""
        with self._guard:
            return self._compiled_unlocked()

    def _compiled_unlocked(self):
        from . import compiled

        if not compiled.enabled():
            return None
        if self._compiled is None:
            self._compiled = compiled.CompiledDecode(self.model)
        return self._compiled

    def scheduler(self, config):
        """This model's continuous-batching scheduler (one, made on first use), or None for
        a model whose KV cache cannot be batched. It has the same generate / stream /
        generate_tokens methods as this object."""
        from . import serving

        with self._guard:
            if self._scheduler is None and serving.Scheduler.supports(self.model):
                self._scheduler = serving.Scheduler(self.model, self.tokenizer, config,
                                                    compiled=self._compiled_unlocked())
            return self._scheduler

    def close_scheduler(self) -> None:
        """Back to one call at a time; the scheduler's thread ends (running streams cancel)."""
        with self._guard:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close()

    @property
    def scoring_model(self):
        """The module fill-mask and NSP score text with: at `fast` on a CPU with int8 dot
        products, an int8 x int8 twin of `model` sharing its embeddings (its cost barely grows
        with the tokens scored at once); else `model` itself."""
        from .quantized_lm import scoring_model

        return scoring_model(self.model)

    def fill_mask(self, text: str, top_k: int, targets: list, batched: bool = False):
        """BERT's task approximated left to right (see fill_mask.py)."""
        from .fill_mask import CausalFill

        return CausalFill(self, self.scorer() if batched else None).fill(text, top_k, targets)

    def next_sentence(self, first: str, second: str, batched: bool = False) -> float:
        """P(second follows first) from calibrated pointwise mutual information (nsp.py)."""
        from . import nsp

        calib = nsp.calibration(self.name)
        pmi = nsp.pmi_per_token(self.scoring_model, self.tokenizer, first, second,
                                self.scorer() if batched else None)
        return nsp.logistic(calib["weight"] * pmi + calib["bias"])

    def scorer(self):
        """The micro-batcher of this model's text scoring (`lm_scoring.run_rows`): when
        serving, concurrent fill-mask / NSP requests run their prefixes and score their
        candidates in shared forwards. None for a model whose KV cache cannot be padded and
        stacked."""
        from functools import partial

        from . import lm_scoring, serving
        from .microbatch import MicroBatcher

        if self.device.type == "cpu" and (str(self.precision).startswith("fast")
                                          or self.scoring_model is not self.model):
            # the CPU's weight-only int4/int8 kernels cost grows with the rows: 8 users
            # sharing forwards got 0.82x (fill-mask) and 0.93x (NSP) the throughput of taking
            # turns (bench_fill_mask.py part 3). On the int8 x int8 twin sharing pays (1.12x,
            # 2.42x) but is not exact: its rounding of each activation turns the float noise
            # of another batch shape into visibly different scores (a top fill-mask score
            # 0.983 shared, 0.958 alone), so a user's answer would depend on who else asks.
            # At fp32 (and on a GPU) shared rows equal lone ones, and sharing pays.
            return None
        with self._guard:
            if self._scorer is None and serving.Scheduler.supports(self.model):
                self._scorer = MicroBatcher(partial(lm_scoring.run_rows, self.scoring_model),
                                            max_batch=96)
            return self._scorer

    FAST = "fast_causal_lm"


class MaskedLM(TextRole):
    """A masked LM (BERT): fill-mask with the model's own probabilities."""

    def __init__(self, model, tokenizer, name: str, precision: str = "exact (fp32)"):
        super().__init__(model, tokenizer, name, precision)
        # The vocabulary head costs more than the whole encoder on short inputs (bert-base:
        # 768 x 30522 per position): apply it to the mask positions only, where we know how.
        self.base = getattr(model, model.base_model_prefix, None)
        self.head = next((getattr(model, n) for n in ("cls", "lm_head") if hasattr(model, n)),
                         None)
        self._batcher = None
        self._guard = threading.Lock()

    def fill_mask(self, text: str, top_k: int, targets: list, batched: bool = False):
        from .fill_mask import MaskedFill

        return MaskedFill(self, batched).fill(text, top_k, targets)

    def forward(self, rows: list, positions: list, batched: bool = False) -> torch.Tensor:
        """(B, P, V) float logits at `positions[b]` (P per row) of rows of token ids. With
        `batched`, a single row shares its forward with other requests' rows (serving)."""
        if not (batched and len(rows) == 1):
            return self._logits(rows, positions)
        from .microbatch import MicroBatcher

        with self._guard:
            if self._batcher is None:
                self._batcher = MicroBatcher(self._shared_forward, max_batch=16)
        return self._batcher([(rows[0], positions[0])])[0][None]

    def _shared_forward(self, items: list) -> list:
        """[(row, positions)] of several requests -> [(P_i, V) logits], one forward."""
        width = max(len(p) for _, p in items)
        padded = [list(p) + [p[0]] * (width - len(p)) for _, p in items]
        out = self._logits([r for r, _ in items], padded)                 # (B, P, V)
        return [out[i, :len(p)] for i, (_, p) in enumerate(items)]

    @torch.inference_mode()
    def _logits(self, rows: list, positions: list) -> torch.Tensor:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        at = torch.tensor(positions, device=self.device)                        # (B, P)
        batch = torch.arange(len(rows), device=self.device).unsqueeze(1)
        if self.base is not None and self.head is not None:
            hidden = self.base(input_ids=ids, attention_mask=mask)[0]            # (B, T, H)
            return self.head(hidden[batch, at]).float()
        return self.model(input_ids=ids, attention_mask=mask).logits[batch, at].float()

    FAST = "fast_text_encoder"


class NSPHead(TextRole):
    """BERT's next-sentence head: softmax over IsNext / NotNext, as transformers has it."""

    def __init__(self, model, tokenizer, name: str, precision: str = "exact (fp32)"):
        super().__init__(model, tokenizer, name, precision)
        self._batcher = None
        self._guard = threading.Lock()

    def next_sentence(self, first: str, second: str, batched: bool = False) -> float:
        """With `batched`, the pair shares its forward with other requests' (serving)."""
        if not batched:
            return self.score([(first, second)])[0]
        from .microbatch import MicroBatcher

        with self._guard:
            if self._batcher is None:
                self._batcher = MicroBatcher(self.score, max_batch=32)
        return self._batcher([(first, second)])[0]

    def score(self, pairs: list) -> list:
        """P(IsNext) of each (first, second) pair, one forward."""
        return self.postprocess(self.forward(self.preprocess(pairs)))

    def preprocess(self, pairs: list) -> dict:
        """Token ids of (first, second) pairs, padded to one batch."""
        firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
        return self.tokenizer(firsts, seconds, truncation="longest_first", padding=True,
                              max_length=self.max_length(), return_tensors="pt")

    @torch.inference_mode()
    def forward(self, enc) -> torch.Tensor:
        """(B, 2) logits."""
        return self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits.float()

    @staticmethod
    def postprocess(logits: torch.Tensor) -> list:
        return logits.softmax(-1)[:, 0].tolist()                        # index 0 = IsNext

    FAST = "fast_text_encoder"


def require(obj, method: str, what: str):
    """`obj`'s bound `method`, or a clear InputError naming the model and the task."""
    fn = getattr(obj, method, None)
    if fn is None:
        raise InputError(f"{getattr(obj, 'name', type(obj).__name__)} cannot {what}.")
    return fn
