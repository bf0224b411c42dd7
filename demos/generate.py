"""Text generation tab: streaming, sampling controls, live stats, a token view coloured by
probability with the alternatives at each step, regenerate-from-here, and copy-as-code."""

import contextlib
import html
import threading
import time

import gradio as gr
import pandas as pd

from mmcore import InputError, generation
from mmcore.text import as_number

from .context import AppContext, Pacer, guarded

TITLE = "Generate"
EXAMPLES = ["Write a haiku about the sea.", "Explain what a transformer model is in two sentences.",
            "Give me three ideas for a birthday present for my sister.",
            "Once upon a time, in a village by the mountains,"]
CHAT_MODES = {"auto": None, "chat template": True, "plain continuation": False}
BUCKETS = [(0.9, "p ≥ 0.9"), (0.5, "0.5 ≤ p < 0.9"), (0.2, "0.2 ≤ p < 0.5"), (0.0, "p < 0.2")]
LIGHT, HEAVY = 0.1, 1.0   # seconds between streamed updates of the text, of the token view
COLORS = {"p ≥ 0.9": "#d1fae5", "0.5 ≤ p < 0.9": "#fef9c3", "0.2 ≤ p < 0.5": "#fed7aa",
          "p < 0.2": "#fecaca", "your pick": "#bfdbfe"}


def bucket(info: dict) -> str:
    if info["forced"] and info.get("picked"):
        return "your pick"
    return next(label for floor, label in BUCKETS if info["prob"] >= floor)


def token_view(tokens: list) -> list:
    return [(t["text"] or " ", bucket(t)) for t in tokens]


def parse_seed(value):
    """Blank: a fresh seed. Otherwise a whole number ("inf", "1e400" and NaN are refused)."""
    text = str(value if value is not None else "").strip()
    if not text:
        return None
    return as_number(text, "Seed", -2**63, 2**63 - 1, integer=True)


def stats(run: generation.Generation, started: float) -> str:
    """The stats line; tokens/s is live while the run streams (`started`: perf_counter at
    its start), the run's own figure once it has finished."""
    rate = run.tokens_per_second
    if not run.seconds and len(run.tokens) > 1:
        decode = time.perf_counter() - started - run.ttft
        rate = (len(run.tokens) - 1) / decode if decode > 0 else 0.0
    rate = f"{rate:.1f}" if len(run.tokens) > 1 else "–"     # one token has no rate
    return (f"{len(run.tokens)} tokens · {rate} tokens/s · "
            f"time to first token {run.ttft * 1000:.0f} ms · prompt {run.prompt_tokens} tokens"
            f" · seed {run.params.seed}"
            + (" · stopped" if run.finish == "cancelled" else
               f" · finished: {run.finish}" if run.finish else ""))


def code_snippet(kit_name: str, prompt: str, p: generation.SamplingParams,
                 forced=None, model: str | None = None) -> str:
    """Python that reproduces the run on screen (with its forced prefix after a
    regenerate-from-here; with the model loaded on the Models tab, if one was picked)."""
    args = (f"max_new_tokens={p.max_new_tokens}, temperature={p.temperature}, top_k={p.top_k}, "
            f"top_p={p.top_p},\n    repetition_penalty={p.repetition_penalty}, seed={p.seed}, "
            f"stop={tuple(p.stop)!r}, chat={p.chat!r},\n")
    load = f"kit = mmcore.load_kit({kit_name!r})\n"
    if model and model.startswith("loaded: "):
        load = f"kit = mmcore.load_kit({kit_name!r}, causal_lm={model[len('loaded: '):]!r})\n"
    if not forced:
        return ("import mmcore\n\n" + load +
                f"text = kit.generate(\n    {prompt!r},\n    {args})\nprint(text)\n")
    return ("import mmcore\nfrom mmcore.generation import Generation, SamplingParams\n\n" +
            load +
            f"params = SamplingParams(\n    {args})\n"
            "# the tokens kept before the point picked, then the alternative chosen there\n"
            f"forced = {list(forced)!r}\n"
            "run = Generation(params)\n"
            f"for _ in kit.generate_tokens({prompt!r}, params, forced=forced, run=run):\n"
            "    pass\nprint(run.text)\n")


def build(ctx: AppContext) -> None:
    # Stop ends a run from inside (its last update is then whole and marked stopped), not by
    # cancelling the event, whose late updates would land after Stop's. {session: Event}
    stops: dict = {}

    def run_stream(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                   stop, chat, model="base model", forced=None, picked_at=None, request=None):
        kit = ctx.role_kit("causal_lm", model)
        params = generation.SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=parse_seed(seed),
            stop=tuple(s for s in (stop or "").split("\n") if s), chat=CHAT_MODES.get(chat))
        run = generation.Generation(params)
        session = getattr(request, "session_hash", None)
        halt = stops.setdefault(session, threading.Event())    # made by Generate's click
        tokens, started = [], time.perf_counter()
        light = Pacer(LIGHT, lambda: ctx.streams.interval(LIGHT, HEAVY))
        heavy = Pacer(HEAVY)

        def update(final=False):
            """Text and stats at most every LIGHT s (rarer while many streams run: they
            share `ctx.streams`' budget), the token view, code and state every HEAVY s
            (re-drawing a long token view starves the browser), everything at the end; None
            when nothing is due (no update is sent: each one costs the decoding thread
            time)."""
            if run.behind and not final:    # more tokens are here already: show them too
                return None
            now = time.perf_counter()
            big = heavy.due(now) or final
            small = light.due(now) or big
            if not small:
                return None
            return (run.text, stats(run, started),
                    token_view(tokens) if big else gr.skip(),
                    code_snippet(ctx.kit.name, prompt, run.params, forced, model) if big
                    else gr.skip(),
                    {"prompt": prompt, "tokens": list(tokens)} if big else gr.skip())

        try:
            with contextlib.ExitStack() as decoding:
                # the handler sleeps until its next update is due, not woken per token
                for i, info in enumerate(kit.generate_tokens(prompt, params, halt, forced,
                                                             run, pace=light.wait)):
                    if i == 0:                      # counted from its first token, not
                        decoding.enter_context(ctx.streams.running())   # while it waits
                    tokens.append({"text": info.text, "prob": info.prob, "id": info.token_id,
                                   "forced": info.forced, "picked": i == picked_at,
                                   "alternatives": info.alternatives})
                    shown = update()
                    if shown is not None:
                        yield shown
            yield update(final=True)
        finally:
            if stops.get(session) is halt:
                stops.pop(session)

    @guarded
    def generate(prompt, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                 repetition_penalty=1.0, seed=None, stop=None, chat="auto",
                 model="base model", request: gr.Request = None):
        """Stream a continuation of the prompt (chat template when `chat`) by the kit's
        causal LM, or one loaded on the Models tab ("loaded: NAME")."""
        yield from run_stream(prompt, max_new_tokens, temperature, top_k, top_p,
                              repetition_penalty, seed, stop, chat, model, request=request)

    @guarded
    def alternatives(state, evt: gr.SelectData):
        """The top-5 tokens at the selected position."""
        if not state or evt.index is None:
            raise InputError("Generate something first, then click one of its tokens.")
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        info = state["tokens"][index]
        rows = [[repr(text), round(p, 4)] for text, p, _ in info["alternatives"]]
        choices = [(f"{text!r}  ({p:.3f})", j) for j, (text, p, _) in
                   enumerate(info["alternatives"])]
        return (index, rows, gr.update(choices=choices, value=1 if len(choices) > 1 else 0),
                f"Token {index + 1}: {html.escape(repr(info['text']))}, p = {info['prob']:.3f}")

    @guarded
    def regenerate_from(state, index, choice, prompt, max_new_tokens, temperature, top_k, top_p,
                        repetition_penalty, seed, stop, chat, model="base model",
                        request: gr.Request = None):
        """Keep the tokens before the selected one, put the chosen alternative there, go on."""
        if not state or index is None or choice is None:
            raise InputError("Click a token in the token view and choose an alternative first.")
        tokens = state["tokens"]
        alt = tokens[int(index)]["alternatives"][int(choice)][2]
        forced = [t["id"] for t in tokens[:int(index)]] + [alt]
        new = max(1, int(max_new_tokens) - len(forced))
        yield from run_stream(state["prompt"], new, temperature, top_k, top_p,
                              repetition_penalty, seed, stop, chat, model, forced, int(index),
                              request)

    spec = ctx.kit.spec("causal_lm")
    gr.Markdown(f"Causal LM: **{spec.name}**. Temperature 0 is greedy (token for token what "
                "`model.generate` gives). Click a token in the token view to see the "
                "alternatives the model weighed there, and regenerate from that point.")
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=4, max_length=20000, value=EXAMPLES[0])
            with gr.Row():
                go = gr.Button("Generate", variant="primary")
                stop_btn = gr.Button("Stop", variant="stop")
                again = gr.Button("Regenerate (new seed)")
            output = gr.Textbox(label="Output", lines=8, interactive=False)
            live = gr.Markdown(label="Stats")
        with gr.Column(scale=2):
            max_new = gr.Slider(1, generation.MAX_NEW_TOKENS, value=128, step=1,
                                label="Max new tokens")
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)")
            top_k = gr.Slider(0, 200, value=50, step=1, label="Top k (0 = off)")
            top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top p")
            penalty = gr.Slider(1, 2, value=1.1, step=0.05, label="Repetition penalty")
            seed = gr.Textbox(label="Seed (blank = random; the one used is shown below)",
                              max_length=20)
            stop = gr.Textbox(label="Stop sequences (one per line)", lines=2, max_length=1000)
            chat = gr.Radio(list(CHAT_MODES), value="auto", label="Prompt format",
                            info="auto: the chat template when the model has one")
            model_choices = lambda: ["base model"] + ctx.loaded_choices("causal_lm")  # noqa
            model = gr.Dropdown(model_choices(), value="base model", allow_custom_value=True,
                                label="Model (load others on the Models tab)")
            model.focus(lambda: gr.update(choices=model_choices()), None, model,
                        api_visibility="private")
    gr.Examples([[e] for e in EXAMPLES], [prompt])
    tokens = gr.HighlightedText(label="Token view (coloured by the model's probability)",
                                color_map=COLORS, show_legend=True, combine_adjacent=False)
    with gr.Row():
        with gr.Column():
            picked = gr.Markdown("Click a token above.")
            alt_table = gr.Dataframe(headers=["alternative", "probability"], interactive=False,
                                     label="Top-5 at that step")
        with gr.Column():
            alt_choice = gr.Radio(label="Alternative to use", choices=[], type="value")
            from_here = gr.Button("Regenerate from here with this alternative")
    code = gr.Code(label="Copy as code", language="python")
    state = gr.State(None)
    index = gr.State(None)

    inputs = [prompt, max_new, temperature, top_k, top_p, penalty, seed, stop, chat, model]
    outputs = [output, live, tokens, code, state]
    run_buttons, pick = [go, again, from_here], [picked, alt_table, alt_choice, index]

    def lock(request: gr.Request = None):
        """While a run streams, the run buttons are off (double clicks queue no extra runs);
        a fresh stop switch, so Stop works even while the run waits in the queue."""
        stops[getattr(request, "session_hash", None)] = threading.Event()
        return [gr.update(interactive=False)] * len(run_buttons)

    def unlock():
        return [gr.update(interactive=True)] * len(run_buttons)

    def unpick():
        """The last run's token panel goes with it."""
        return ("Click a token above.", pd.DataFrame(columns=["alternative", "probability"]),
                gr.update(choices=[], value=None), None)

    def stop_run(request: gr.Request = None):
        """Stop this session's run at its next token; it then shows itself, marked stopped."""
        halt = stops.get(getattr(request, "session_hash", None))
        if halt is not None:
            halt.set()

    private = dict(api_visibility="private")
    def start(request: gr.Request = None):
        return lock(request) + list(unpick())

    def start_new_seed(request: gr.Request = None):
        return [""] + start(request)

    event = go.click(start, None, run_buttons + pick, **private).then(
        generate, inputs, outputs, api_name="generate", **ctx.model_event("generate"))
    again_event = again.click(start_new_seed, None, [seed] + run_buttons + pick, **private).then(
        generate, inputs, outputs, **private, **ctx.model_event("generate"))
    tokens.select(alternatives, [state], [index, alt_table, alt_choice, picked], **private)
    here_event = from_here.click(lock, None, run_buttons, **private).then(
        regenerate_from, [state, index, alt_choice] + inputs, outputs, **private,
        **ctx.model_event("generate"))
    for ran in (event, again_event):
        ran.then(unlock, None, run_buttons, **private)
    here_event.then(lambda: unlock() + list(unpick()), None, run_buttons + pick, **private)
    stop_btn.click(stop_run, None, None, **private)
    from . import chat

    chat.build(ctx)                   # chat mode, below plain completion
