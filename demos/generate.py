"""Text generation tab: streaming, sampling controls, live stats, a token view coloured by
probability with the alternatives at each step, regenerate-from-here, and copy-as-code."""

import html

import gradio as gr

from mmcore import InputError, generation
from mmcore.text import as_number

from .context import AppContext, guarded

TITLE = "Generate"
EXAMPLES = ["Write a haiku about the sea.", "Explain what a transformer model is in two sentences.",
            "Give me three ideas for a birthday present for my sister.",
            "Once upon a time, in a village by the mountains,"]
CHAT_MODES = {"auto": None, "chat template": True, "plain continuation": False}
BUCKETS = [(0.9, "p ≥ 0.9"), (0.5, "0.5 ≤ p < 0.9"), (0.2, "0.2 ≤ p < 0.5"), (0.0, "p < 0.2")]
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


def stats(run: generation.Generation) -> str:
    return (f"{len(run.tokens)} tokens · {run.tokens_per_second:.1f} tokens/s · "
            f"time to first token {run.ttft * 1000:.0f} ms · prompt {run.prompt_tokens} tokens"
            f" · seed {run.params.seed}"
            + (f" · finished: {run.finish}" if run.finish else ""))


def code_snippet(kit_name: str, prompt: str, p: generation.SamplingParams) -> str:
    return ("import mmcore\n\n"
            f"kit = mmcore.load_kit({kit_name!r})\n"
            f"text = kit.generate(\n    {prompt!r},\n    max_new_tokens={p.max_new_tokens}, "
            f"temperature={p.temperature}, top_k={p.top_k}, top_p={p.top_p},\n"
            f"    repetition_penalty={p.repetition_penalty}, seed={p.seed}, "
            f"stop={list(p.stop)!r}, chat={p.chat!r},\n)\nprint(text)\n")


def build(ctx: AppContext) -> None:
    def run_stream(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                   stop, chat, forced=None, picked_at=None):
        params = generation.SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=parse_seed(seed),
            stop=tuple(s for s in (stop or "").split("\n") if s), chat=CHAT_MODES.get(chat))
        run = generation.Generation(params)
        tokens = []
        for i, info in enumerate(ctx.kit.generate_tokens(prompt, params, forced=forced,
                                                         run=run)):
            tokens.append({"text": info.text, "prob": info.prob, "id": info.token_id,
                           "forced": info.forced, "picked": i == picked_at,
                           "alternatives": info.alternatives})
            if i % 4 == 0 or info.forced:
                yield run.text, stats(run), gr.skip(), gr.skip(), gr.skip()
        state = {"prompt": prompt, "tokens": tokens}
        yield (run.text, stats(run), token_view(tokens),
               code_snippet(ctx.kit.name, prompt, run.params), state)

    @guarded
    def generate(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                 stop, chat):
        """Stream a continuation of the prompt (chat template when `chat`)."""
        yield from run_stream(prompt, max_new_tokens, temperature, top_k, top_p,
                              repetition_penalty, seed, stop, chat)

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
                        repetition_penalty, seed, stop, chat):
        """Keep the tokens before the selected one, put the chosen alternative there, go on."""
        if not state or index is None or choice is None:
            raise InputError("Click a token in the token view and choose an alternative first.")
        tokens = state["tokens"]
        alt = tokens[int(index)]["alternatives"][int(choice)][2]
        forced = [t["id"] for t in tokens[:int(index)]] + [alt]
        new = max(1, int(max_new_tokens) - len(forced))
        yield from run_stream(state["prompt"], new, temperature, top_k, top_p,
                              repetition_penalty, seed, stop, chat, forced, int(index))

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
            live = gr.Markdown()
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

    inputs = [prompt, max_new, temperature, top_k, top_p, penalty, seed, stop, chat]
    outputs = [output, live, tokens, code, state]
    event = go.click(generate, inputs, outputs, api_name="generate",
                     **ctx.model_event("generate"))
    again_event = again.click(lambda: "", None, seed, api_visibility="private").then(
        generate, inputs, outputs, api_visibility="private", **ctx.model_event("generate"))
    tokens.select(alternatives, [state], [index, alt_table, alt_choice, picked],
                  api_visibility="private")
    here_event = from_here.click(regenerate_from, [state, index, alt_choice] + inputs, outputs,
                                 api_visibility="private", **ctx.model_event("generate"))
    stop_btn.click(None, None, None, cancels=[event, again_event, here_event],
                   api_visibility="private")
    from . import chat

    chat.build(ctx)                   # chat mode, below plain completion
