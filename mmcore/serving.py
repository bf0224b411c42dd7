"""Serving many users: continuous batching for generation, and short work first.

`Scheduler` runs one thread per causal LM that decodes every active stream in one forward
per step (as text-generation-inference and vLLM do). A stream's prompt (plus any forced
tokens) is prefilled at batch 1, exactly as `generation.generate_tokens` does it, or, when
several streams join at once, in one left-padded forward with theirs; the KV cache rows then
join the batch between two decode steps. The batch is one `DynamicCache` (its layers write
each step's keys and values in place: `kv_cache`), left-padded: each row has its own
attention mask and explicit position ids, so a row reads the same keys at the same
positions as it would alone. A stream leaves the batch on EOS, a stop sequence,
`max_new_tokens`, its own stop event, or when its consumer closes the generator (Gradio's
Stop, a dropped client); its row is removed before the next step and columns that only
padding still uses are trimmed.

Everything about a token stays per stream: sampling parameters, repetition penalty, its own
`torch.Generator` (so a seed gives the same text whatever the batch holds), stop sequences,
forced tokens, and the `TokenInfo` records with probabilities and top-5 alternatives that
`generate_tokens` yields.

transformers' own continuous-batching manager (`generation/continuous_batching`) was not
used: it takes one generation config for every request, reports only the chosen token's
log-probability (no alternatives) and has no forced tokens; its paged cache targets GPUs.

Short work (fill-mask, a search, zero-shot) cuts in through `lanes.PRIORITY`: on a GPU, or
a CPU whose cores the scheduler fills, the scheduler pauses between steps while one runs,
so a short request waits at most one decode step; where the scheduler keeps fewer cores
while short work runs (one thread on a small CPU), short work runs on the others and
decoding goes on. On a CPU the scheduler decodes on every core while neither short nor long
work runs (`lanes.PRIORITY`), where OpenMP pools can be let go of (`lanes.release_threads`).
"""

import queue
import threading
import time
from dataclasses import asdict, dataclass

import torch

from . import lm_scoring
from .compiled import prefill
from .errors import InputError
from .lanes import PRIORITY, can_release_threads, cpu_cores, default_threads, release_threads
from .generation import (Generation, SamplingParams, TokenInfo, TokenText, _alternatives,
                         _process, context_length, draw, eos_ids, prompt_ids, text_pieces,
                         use_chat)
from .generation import MAX_CANDIDATES, TOP_ALTERNATIVES
from .text import clean_text

PREFILL_CHUNK = 128     # prompt tokens per forward while other streams decode (`_chunked_prefill`)
PREFILL_TOKENS = 512    # positions (padding included) of one forward over joining prompts


@dataclass
class ServingConfig:
    max_batch: int = 8              # streams decoded together; more wait to join
    token_budget: int = 0           # prompt + max_new_tokens over the batch (0 = no bound)
    idle_seconds: float = 30.0      # the scheduler thread exits after this long without work
    max_pause: float = 1.0          # longest pause for short work before the next step
    threads: int = 0                # CPU threads of the scheduler's ops (0: decode_threads())
    # CPU threads while no short work runs (0: every core where this thread's OpenMP pool
    # can be let go of between bursts, `lanes.release_threads`; else `threads`)
    max_threads: int = 0
    # pause between steps while short work runs (None: unless the scheduler leaves CPU
    # cores free, where short work runs on those instead and decoding goes on)
    pause_for_short: bool | None = None


def decode_threads(device) -> int:
    """Intra-op threads the scheduler thread keeps on a CPU while short work runs beside it:
    1 on a small machine (short work gets the other cores), half the cores on a larger one."""
    if torch.device(device).type != "cpu":
        return 0                                  # GPU work: the CPU threads do not matter
    cores = cpu_cores()
    return 1 if cores <= 4 else max(1, default_threads() // 2)


def decode_threads_alone(device) -> int:
    """Intra-op threads the scheduler thread uses on a CPU while no short work runs: every
    core, where OpenMP thread pools can be let go of (`lanes.release_threads`: other
    threads' idle pools would make this one sleep between its parallel regions), else
    `decode_threads`. Measured on 2 cores (SmolLM2 Q4, fast, a decode step in the
    scheduler's thread): batch 1 26.2 ms on 1 thread, 19.5 on 2; batch 8 58.6 -> 37.3."""
    keep = decode_threads(device)
    if torch.device(device).type != "cpu" or not can_release_threads():
        return keep
    return max(keep, default_threads())


class _Stream:
    """One request's state; the scheduler thread alone advances it."""

    def __init__(self, ids, forced, params, stop_event, eos, strings, tok, device):
        self.ids, self.forced, self.params = ids, forced, params
        self.stop_event, self.eos, self.strings = stop_event, eos, strings
        self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.shown = TokenText(tok, ids, params.stop)     # the same text as generate_tokens
        self.last: TokenInfo | None = None
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.generated: list = []
        self.closed = False          # the consumer went away
        self.ended = threading.Event()      # set once its last item is queued
        self.finish = ""
        self.start = time.perf_counter()
        self.cost = len(ids) + len(forced) + params.max_new_tokens

    @property
    def cancelled(self) -> bool:
        return self.closed or (self.stop_event is not None and self.stop_event.is_set())

    def _choose(self, row: torch.Tensor) -> int:
        p = self.params
        if p.temperature == 0 and p.repetition_penalty == 1.0:
            return int(row.argmax())
        seen = torch.tensor(self.ids + self.generated, device=row.device) \
            if p.repetition_penalty != 1.0 else None
        final = _process(row, seen, p)
        if p.temperature == 0:
            return int(final.argmax())
        return draw(final, self.generator)

    def advance(self, row: torch.Tensor, probs: torch.Tensor, forced_token=None,
                alternatives=None) -> bool:
        """One token from (V,) float logits (or the forced one); True when the stream ends.
        The same rules as `generation.generate_tokens`, token for token."""
        is_forced = forced_token is not None
        token = forced_token if is_forced else self._choose(row)
        self.generated.append(token)
        ttft = time.perf_counter() - self.start
        if token in self.eos and not is_forced:
            return self.end("eos")
        if alternatives is None:
            alternatives = _alternatives(self.strings, probs)
        info = TokenInfo(token, "", float(probs[token]), alternatives, is_forced)
        stopped = self.shown.add(info)
        self.last = info
        self.out.put((info, self.shown.shown, ttft))
        if stopped:
            return self.end("stop")
        if not is_forced and len(self.generated) - len(self.forced) >= self.params.max_new_tokens:
            return self.end("length")
        return False

    def end(self, finish: str, error: BaseException | None = None) -> bool:
        self.finish = self.finish or finish
        if error is not None:
            self.out.put(error)
        else:
            if self.finish != "stop":
                self.shown.finish(self.last)       # bytes the detokenizer still held
            self.out.put(("end", self.shown.shown))
        self.ended.set()
        return True


class Scheduler:
    """Continuous batching for one causal LM. Thread-safe; its thread starts on demand."""

    def __init__(self, model, tok, config: ServingConfig | None = None, compiled=None):
        self.model, self.tok = model, tok
        # a stream decoding alone uses the model's compiled step (compiled.CompiledDecode)
        # once its bucket is ready; a second stream turns its cache into a batch's
        self.compiled = compiled
        self._single = None                 # (step function) while the lone stream uses it
        self.config = config or ServingConfig()
        default_threads()           # taken before the scheduler thread sets its own count
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tok)
        self._cond = threading.Condition()
        self._waiting: list = []            # streams not yet prefilled
        self._thread: threading.Thread | None = None
        self._closed = False
        # the batch; only the scheduler thread touches it
        self._active: list = []             # _Stream per row
        self._cache = None                  # DynamicCache, (B, heads, T, head_dim) per layer
        self._mask = None                   # (B, T) 1 = a real token
        self._pos = None                    # (B,) position of each row's next token
        self._next = None                   # (B,) token each row feeds next
        self.steps = 0                      # decode steps run (for tests and stats)
        self.admitted = 0                   # streams taken from the waiting list
        self.peak_batch = 0

    @staticmethod
    def supports(model) -> bool:
        """True for models whose KV cache is full attention in every layer (GPT-2, Llama,
        ...): rows of such a cache can be padded, stacked and dropped."""
        from transformers import DynamicCache

        try:
            layers = DynamicCache(config=model.config).layers
        except Exception:  # noqa: BLE001 - an exotic config: serve it one call at a time
            return False
        return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)

    # ---------------------------------------------------------------- public API

    def generate_tokens(self, prompt, params: SamplingParams, stop_event=None,
                        forced: list | None = None, run: Generation | None = None, pace=None):
        """As `generation.generate_tokens(model, tok, ...)`, decoded in the shared batch.
        `pace`: for a consumer that shows tokens now and then, a callable giving the seconds
        until it wants the next ones (`_drain`)."""
        stream, run = self._make_stream(prompt, params, stop_event, forced, run)
        self._submit([stream])
        yield from self._drain(stream, run, pace)

    def generate(self, prompt, params: SamplingParams, num_candidates: int = 1):
        """As `generation.generate`; the candidates decode side by side in the batch."""
        n = int(num_candidates)
        if not 1 <= n <= MAX_CANDIDATES:
            raise InputError(f"num_candidates must be between 1 and {MAX_CANDIDATES}, not {n}.")
        params = params.check()
        made = [self._make_stream(prompt, SamplingParams(**{**asdict(params),
                                                            "seed": params.seed + i}))
                for i in range(n)]
        self._submit([s for s, _ in made])
        outs = []
        for stream, run in made:
            for _ in self._drain(stream, run):
                pass
            outs.append(run.text)
        return outs[0] if n == 1 else outs

    def stream(self, prompt, params: SamplingParams, stop_event=None):
        """Text pieces, as `generation.stream`: never a piece of a stop sequence."""
        run = Generation(params)
        yield from text_pieces(run, self.generate_tokens(prompt, params, stop_event, run=run))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; streams still running or waiting end as "cancelled"."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        PRIORITY.wake()
        if thread is not None:
            thread.join(timeout)

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def load(self) -> dict:
        """What the batch holds now: {"active", "waiting"}."""
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting)}

    # ---------------------------------------------------------------- the caller's side

    def _make_stream(self, prompt, params, stop_event=None, forced=None, run=None):
        prompt = clean_text(prompt, "Prompt")
        params = params.check()
        run = run if run is not None else Generation(params)
        run.params = params
        ids = prompt_ids(self.tok, prompt, use_chat(self.tok, params.chat))
        forced = [int(t) for t in (forced or [])]
        limit = context_length(self.model)
        run.prompt_tokens = len(ids)
        if len(ids) + len(forced) + params.max_new_tokens > limit:
            raise InputError(f"inputs ({len(ids) + len(forced)} tokens) + max_new_tokens "
                             f"({params.max_new_tokens}) must be <= {limit}, the model's "
                             "context.")
        stream = _Stream(ids, forced, params, stop_event, self.eos,
                         lm_scoring.token_strings(self.tok), self.tok, self.device)
        return stream, run

    def _submit(self, streams: list) -> None:
        # the caller's thread now only waits for tokens: OpenMP workers it kept from earlier
        # torch work (making this scheduler, a fill-mask call) would make the scheduler's
        # sleep between their parallel regions (offline kit, one stream on 2 cores, plain
        # Python after `kit.serve()`: a step 20 -> 11 ms, a 12-token prefill 45 -> 25 ms)
        release_threads()
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._waiting.extend(streams)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="mmcore-scheduler",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _drain(self, stream: _Stream, run: Generation, pace=None):
        """Hand the stream's tokens to the caller; `run` is filled with what was yielded.

        `pace() -> seconds`: after the first token, once the caller has taken every token
        there is, the caller's thread sleeps that long (or until the stream ends, its Stop
        included) and then takes what came meanwhile at once. Woken on every token instead,
        eight handler threads took the GIL eight times a step, which the scheduler's thread
        needs between its ops (through the app, 8 users: a step 24-29 -> 22.6-23.1 ms).
        After a Stop, an unpaced caller gets no further token; a paced one still gets those
        decoded while it slept (it would have taken them had it been awake)."""
        try:
            while True:
                if stream.stop_event is not None and stream.stop_event.is_set() and \
                        (pace is None or stream.out.empty()):
                    run.finish = "cancelled"
                    break
                if pace is not None and run.tokens and stream.out.empty():
                    wait = pace()
                    if wait > 0:
                        stream.ended.wait(wait)
                        self._check_alive(stream)
                        continue
                item = self._take(stream)
                if isinstance(item, tuple) and item[0] == "end":
                    run.finish, run.text = stream.finish, item[1]
                    break
                if isinstance(item, BaseException):
                    raise item
                info, text, ttft = item
                if not run.tokens:
                    run.ttft = ttft
                run.tokens.append(info)
                run.text = text
                # tokens queued behind this one (the end's own item is not one)
                run.behind = max(0, stream.out.qsize() - stream.ended.is_set())
                yield info
        finally:
            stream.closed = True            # the scheduler drops it before its next step
            with self._cond:
                self._cond.notify_all()
            run.finish = run.finish or "cancelled"
            run.seconds = time.perf_counter() - stream.start
            run.behind = 0

    def _take(self, stream: _Stream, every: float = 1.0):
        """The stream's next item, waiting for it (`_check_alive` every `every` s)."""
        while True:
            try:
                return stream.out.get(timeout=every)
            except queue.Empty:
                self._check_alive(stream)

    def _check_alive(self, stream: _Stream) -> None:
        """A RuntimeError, not a wait without end, if the scheduler thread has died with
        the stream still in it (every stream it ends gets its item first, so an empty
        queue and no thread mean nothing will come)."""
        if not self.running and stream.out.empty() and not stream.ended.is_set():
            raise RuntimeError("The generation scheduler stopped; please try again.")

    # ---------------------------------------------------------------- the scheduler thread

    def pauses_for_short(self, threads: int | None = None) -> bool:
        """Whether decoding pauses while short work runs: yes on a GPU (one device), and on
        a CPU whose cores the scheduler's threads fill; where it leaves cores free, short
        work runs on those meanwhile. Measured on 2 cores (bench_serving, 8 users with a
        short call a second): pausing for each ~0.5 s fill-mask stopped decoding ~45% of
        the time."""
        if self.config.pause_for_short is not None:
            return self.config.pause_for_short
        threads = threads or self.config.threads or decode_threads(self.device)
        return self.device.type != "cpu" or threads >= cpu_cores()

    def _loop(self) -> None:
        threads = self.config.threads or decode_threads(self.device)
        if threads:
            torch.set_num_threads(threads)     # this thread's own OpenMP team, not the others'
        pause = self.pauses_for_short(threads)
        # no short work running: every core (where other threads' OpenMP pools let go)
        most = threads if pause or not threads else \
            max(threads, self.config.max_threads or decode_threads_alone(self.device))
        held = [0]                  # CPU threads reserved while there is work (no pausing)

        def hold(busy: bool) -> None:
            want = threads if busy and not pause else 0
            if want != held[0]:
                PRIORITY.reserve(want - held[0])
                held[0] = want
            if not busy and most > 1:
                release_threads()   # idle: its workers would slow other threads' (none: ~1 us)

        def pace() -> None:
            """Before a step: every core while no short work runs, else the kept ones
            (short work started since gets the others after at most this step)."""
            n = most if PRIORITY.quiet() else threads
            if n and torch.get_num_threads() != n:
                torch.set_num_threads(n)

        try:
            with PRIORITY.decoding(), torch.inference_mode():
                self._run(pause, hold, pace)
        finally:
            hold(False)

    def _run(self, pause: bool, hold, pace) -> None:
        """The loop: admit, prefill the joining streams, one decode step; `pause`: wait
        between steps while short work runs, else `hold(busy)` says when cores are taken
        and `pace()` sets the threads for the next step."""
        while True:
            with self._cond:
                if not (self._closed or self._waiting or self._active):
                    hold(False)
                while not (self._closed or self._waiting or self._active):
                    if not self._cond.wait(self.config.idle_seconds) and \
                            not (self._waiting or self._closed):
                        self._thread = None           # idle: a later submit restarts it
                        return
                if self._closed:
                    for s in self._waiting + self._active:
                        s.end("cancelled")
                    self._waiting, self._active = [], []
                    self._cache = None
                    return
                joining = self._admit()
            hold(True)
            if pause:
                PRIORITY.wait_turn(self.config.max_pause, lambda: self._closed)
            if self._closed:
                for stream in joining:
                    stream.end("cancelled")
                continue
            pace()
            for group in self._prefill_groups(joining):
                try:
                    if len(group) > 1:
                        self._prefill_together(group)
                    else:
                        self._prefill(group[0], alone=len(joining) == 1 and not self._active)
                except Exception as exc:  # noqa: BLE001 - those streams' own failure
                    self._fail(group, exc)
            self._decode_once()

    def _fail(self, streams: list, exc: BaseException) -> None:
        for s in streams:
            if not s.finish:
                s.end("error", exc)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _admit(self) -> list:
        """Waiting streams that fit in the batch now (under the lock), first come first."""
        room = self.config.max_batch - len(self._active)
        budget = self.config.token_budget or float("inf")
        used = sum(s.cost for s in self._active)
        joining = []
        for stream in list(self._waiting):
            if stream.cancelled:
                self._waiting.remove(stream)
                stream.end("cancelled")
                continue
            if len(joining) >= room or (used + stream.cost > budget and (self._active or joining)):
                break
            self._waiting.remove(stream)
            joining.append(stream)
            self.admitted += 1
            used += stream.cost
        return joining

    @staticmethod
    def _prefill_groups(joining: list) -> list:
        """Streams joining at once, in groups prefilled by one forward each: short prompts
        together (shortest first, at most PREFILL_TOKENS positions a group, padding
        included), each longer one alone (chunked while others decode)."""
        short = sorted((s for s in joining if len(s.ids) + len(s.forced) <= PREFILL_CHUNK),
                       key=lambda s: len(s.ids) + len(s.forced))
        groups, group = [], []
        for stream in short:
            width = len(stream.ids) + len(stream.forced)      # the longest so far
            if group and width * (len(group) + 1) > PREFILL_TOKENS:
                groups.append(group)
                group = []
            group.append(stream)
        groups += [group] if group else []
        return groups + [[s] for s in joining if len(s.ids) + len(s.forced) > PREFILL_CHUNK]

    def _prefill_together(self, streams: list) -> None:
        """Prompts + forced tokens of several streams in one forward, left-padded (each row
        its own mask and positions, as in the batch), then each reports its forced tokens
        and first token, and those still running join the batch. Eight users arriving at
        once: one forward instead of eight (bench_serving)."""
        from transformers import DynamicCache

        from .quantized_lm import prefill_model

        seqs = [s.ids + s.forced for s in streams]
        width, keep = max(map(len, seqs)), max(len(s.forced) for s in streams) + 1
        ids = torch.tensor([[0] * (width - len(q)) + q for q in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in seqs],
                            device=self.device)
        cache = DynamicCache(config=self.model.config)
        logits = prefill_model(self.model)(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            cache=cache, use_cache=True, logits_to_keep=keep).logits               # (n, keep, V)
        going = []
        for i, s in enumerate(streams):
            try:
                if not self._first_tokens(s, logits[i, keep - len(s.forced) - 1:]):
                    going.append(i)
            except Exception as exc:  # noqa: BLE001 - that stream's own failure (its
                self._fail([s], exc)  # sampling settings), not the others'
        if going:
            if len(going) < len(streams):
                idx = torch.tensor(going, device=self.device)
                cache.batch_select_indices(idx)
                mask = mask[idx]
            self._join([streams[i] for i in going], *_trim(cache, mask))

    def _first_tokens(self, s: _Stream, logits: torch.Tensor) -> bool:
        """Report the forced tokens and choose the first one from the prompt's last (F+1)
        rows of logits; True when the stream has ended."""
        for step in range(len(s.forced) + 1):
            if s.cancelled:
                s.end("cancelled")
                return True
            row = logits[step].float()
            forced = s.forced[step] if step < len(s.forced) else None
            if s.advance(row, row.softmax(-1), forced):
                return True
        return False

    def _prefill(self, s: _Stream, alone: bool = False) -> None:
        """Prompt + forced tokens at batch 1; report the forced tokens; join the batch.
        `alone`: it will decode alone (for now), on the compiled step if one is ready."""
        seq = torch.tensor([s.ids + s.forced], device=self.device)
        if self._active and seq.shape[1] > PREFILL_CHUNK:
            logits, cache, fast = self._chunked_prefill(s, seq, len(s.forced) + 1)
            if logits is None:
                return
        else:
            decode = self.compiled if alone and not self._waiting else None
            logits, cache, fast = prefill(self.model, decode, seq, s.cost, len(s.forced) + 1,
                                          wait=False)                           # (F+1, V)
        if not self._first_tokens(s, logits):
            self._join([s], cache, torch.ones_like(seq), fast)

    def _chunked_prefill(self, s: _Stream, seq: torch.Tensor, keep: int) -> tuple:
        """(logits of the last `keep` positions, cache, None): the prompt in chunks of
        PREFILL_CHUNK tokens with one decode step of the running streams after each, so a
        long prompt no longer freezes them for its whole prefill (8,150 digits: 29 s on the
        offline kit), and a Stop or a closed client ends it between chunks ((None,) * 3)."""
        from transformers import DynamicCache

        from .quantized_lm import prefill_model

        runner, cache, total = prefill_model(self.model), DynamicCache(config=self.model.config), \
            seq.shape[1]
        starts = list(range(0, max(total - keep, 1), PREFILL_CHUNK))   # the last holds `keep`
        for i, start in enumerate(starts):
            if s.cancelled or self._closed:
                s.end("cancelled")
                return None, None, None
            last = i == len(starts) - 1
            out = runner(input_ids=seq[:, start:None if last else start + PREFILL_CHUNK],
                         cache=cache, use_cache=True, logits_to_keep=keep if last else 1)
            if not last:
                self._decode_once()
        return out.logits[0], cache, None

    def _decode_once(self) -> None:
        """One decode step of the running streams (those cancelled leave first); a failure
        of the batch's step ends every stream in it."""
        try:
            self._leave([s for s in self._active if s.cancelled], "cancelled")
            if self._active:
                self._step()
        except Exception as exc:  # noqa: BLE001 - every stream in the batch hears
            self._fail(self._active, exc)
            self._active = []
            self._cache = self._mask = self._pos = self._next = self._single = None

    def _join(self, streams: list, cache, mask: torch.Tensor, step=None) -> None:
        """Prefilled streams join the batch: their cache rows (`mask`: (n, T) ones where
        a row has a token) and their last tokens. `step`: a lone stream's compiled step."""
        from transformers import DynamicCache

        from .kv_cache import full_attention, with_room

        if step is None and not all(map(full_attention, cache.layers)):
            raise NotImplementedError("continuous batching needs a full-attention KV cache")
        tokens = torch.tensor([s.generated[-1] for s in streams], device=self.device)
        mask = mask.to(device=self.device, dtype=torch.long)
        lengths = mask.sum(-1)                   # the next token's position in each row
        if self._single is not None:            # the lone stream's static cache: a batch's now
            self._cache = _dynamic(self._cache, self._mask.shape[1])
            self._single = None
        if not self._active:
            self._single = step if len(streams) == 1 else None
            self._cache, self._mask, self._pos, self._next = cache, mask, lengths, tokens
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            layers = [(torch.cat([_pad_left(bk, width), _pad_left(k, width)]),
                       torch.cat([_pad_left(bv, width), _pad_left(v, width)]))
                      for (bk, bv, _), (k, v, _) in zip(self._cache, cache)]
            self._cache = DynamicCache(ddp_cache_data=layers)
            self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)])
            self._pos = torch.cat([self._pos, lengths])
            self._next = torch.cat([self._next, tokens])
        if self._single is None:
            with_room(self._cache)              # decode steps write in place (kv_cache)
        self._active.extend(streams)
        self.peak_batch = max(self.peak_batch, len(self._active))

    def _step(self) -> None:
        """One decode step for every active stream."""
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._active), 1)], dim=1)
        if self._single is not None:            # one stream, on its compiled step
            logits = self._single(self._next[:, None], self._pos, self._cache).float()
        else:
            # no padding in the batch (one stream, or streams of one length): no mask, so
            # the model takes its plain causal path (a mask of ones costs a 4-D mask/layer)
            out = self.model(input_ids=self._next[:, None],
                             attention_mask=None if bool(mask.all()) else mask,
                             position_ids=self._pos[:, None], cache=self._cache, use_cache=True)
            logits = out.logits[:, -1].float()                                     # (B, V)
        self._mask, self._pos = mask, self._pos + 1
        self.steps += 1
        probs = logits.softmax(-1)
        values, ids = probs.topk(TOP_ALTERNATIVES)             # one call for the whole batch
        values, ids = values.tolist(), ids.tolist()
        strings = self._active[0].strings
        done = []
        for i, s in enumerate(self._active):
            alternatives = [(strings[j] if j < len(strings) else "", v, j)
                            for v, j in zip(values[i], ids[i])]
            if s.cancelled:
                done.append(s)
                continue
            try:
                ended = s.advance(logits[i], probs[i], alternatives=alternatives)
            except Exception as exc:  # noqa: BLE001 - that stream's own failure (its
                self._fail([s], exc)  # sampling settings), not its batch's
                ended = True
            if ended:
                done.append(s)
            else:
                self._next[i] = s.generated[-1]
        self._leave(done, "cancelled")

    def _leave(self, streams: list, finish: str) -> None:
        if not streams:
            return
        for s in streams:
            if not s.finish:
                s.end(finish)
        keep = [i for i, s in enumerate(self._active) if s not in streams]
        self._active = [self._active[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._pos = self._next = self._single = None
            return
        idx = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(idx)
        self._pos, self._next = self._pos[idx], self._next[idx]
        self._cache, self._mask = _trim(self._cache, self._mask[idx])


def _trim(cache, mask: torch.Tensor) -> tuple:
    """(cache, mask) without the leading columns that only padding uses."""
    first = int(mask.any(0).int().argmax())
    if first > 0:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        mask = mask[:, first:]
    return cache, mask


def _dynamic(cache, length: int):
    """A static cache's first `length` positions as a DynamicCache (a batch's kind)."""
    from transformers import DynamicCache

    from .kv_cache import full_attention

    if all(map(full_attention, cache.layers)):
        return cache
    return DynamicCache(ddp_cache_data=[(layer.keys[:, :, :length], layer.values[:, :, :length])
                                        for layer in cache.layers])


def _pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before x along its sequence axis (-2 for K/V (B, H, T, D), -1 for a mask)."""
    axis = -1 if x.dim() == 2 else -2
    missing = width - x.shape[axis]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[axis] = missing
    return torch.cat([x.new_zeros(shape), x], dim=axis)
