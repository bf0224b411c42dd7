"""Generate tab, chat mode: a conversation with the causal LM through its own chat template
(history, a system prompt, Send, Continue the last answer, Clear), beside plain completion.
A model without a template gets a plain "User: / Assistant:" transcript (mmcore/chat.py)."""

import contextlib

import gradio as gr

from mmcore import InputError, chat, generation
from mmcore.text import as_number, clean_text

from .context import AppContext, Pacer, guarded
from .generate import HEAVY, LIGHT

MAX_TURN_TOKENS = 512


def plain(history) -> list:
    """Gradio's chat history ({"role", "content": [{"type": "text", "text"}]} per message, or
    plain strings) as [{"role", "content": str}]; anything but text is refused."""
    out = []
    for message in history or []:
        if not isinstance(message, dict):
            raise InputError("The chat history must be a list of messages.")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise InputError("Chat mode takes text messages only.")
            content = "".join(str(p.get("text", "")) for p in content)
        out.append({"role": message.get("role"), "content": content})
    return chat.check(out) if out else []


def build(ctx: AppContext) -> None:
    choices = lambda: ["base model"] + ctx.loaded_choices("causal_lm")        # noqa: E731

    def reply(kit, messages, history, continue_last, max_new_tokens, temperature, seed):
        tok = kit.model("causal_lm").tokenizer
        prompt = chat.render(tok, messages, continue_last=continue_last)
        n = as_number(max_new_tokens, "Max new tokens", 1, MAX_TURN_TOKENS, integer=True)
        temperature = as_number(temperature, "Temperature", 0, 5)
        seed = None if seed in (None, "") else as_number(seed, "Seed", 0, 2**63 - 1,
                                                         integer=True)
        if not continue_last:
            history = history + [{"role": "assistant", "content": ""}]
        start = history[-1]["content"]
        pace = Pacer(LIGHT, lambda: ctx.streams.interval(LIGHT, HEAVY))
        params = generation.SamplingParams(n, temperature, seed=seed, chat=False)
        run = generation.Generation(params)
        # the handler sleeps until its next update is due, not woken per token
        tokens = kit.generate_tokens(prompt, params, run=run, pace=pace.wait)
        try:
            with contextlib.ExitStack() as decoding:
                for i, _ in enumerate(tokens):
                    if i == 0:                      # counted from its first token
                        decoding.enter_context(ctx.streams.running())
                    if not run.behind and pace.due():   # not per token: each update
                        # run.text: what is safe to show (never part of a stop sequence)
                        history[-1] = {"role": "assistant", "content": start + run.text}
                        yield history                   # costs the decoder
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()                       # Stop or a closed page ends the decode too
        history[-1] = {"role": "assistant", "content": start + run.text}
        yield history

    @guarded
    def send(message: str, history: list | None = None, system: str = "",
             max_new_tokens: float = 128, temperature: float = 0.7, seed: str = "",
             model: str = "base model"):
        """Add a user message and stream the assistant's answer (the whole history back)."""
        kit = ctx.role_kit("causal_lm", model)
        history = plain(history)
        message = clean_text(message, "Message")
        history = history + [{"role": "user", "content": message}]
        system = clean_text(system, "System prompt", allow_empty=True).strip()
        messages = ([{"role": "system", "content": system}] if system else []) + history
        yield from reply(kit, messages, history, False, max_new_tokens, temperature, seed)

    @guarded
    def continue_answer(history: list | None = None, system: str = "",
                        max_new_tokens: float = 128, temperature: float = 0.7, seed: str = "",
                        model: str = "base model"):
        """Continue the last assistant answer where it stopped."""
        kit = ctx.role_kit("causal_lm", model)
        history = plain(history)
        if not history or history[-1]["role"] != "assistant":
            raise InputError("Nothing to continue: the last message is not an answer.")
        system = clean_text(system, "System prompt", allow_empty=True).strip()
        messages = ([{"role": "system", "content": system}] if system else []) + history
        yield from reply(kit, messages, history, True, max_new_tokens, temperature, seed)

    with gr.Accordion("Chat mode (the model's chat template)", open=False):
        gr.Markdown("A conversation rendered with the model's own chat template (SmolLM2's "
                    "on the offline kit; a model without one, such as gpt2, gets a plain "
                    "`User:` / `Assistant:` transcript).")
        system = gr.Textbox("", label="System prompt (optional)")
        bot = gr.Chatbot(label="Conversation", height=320)
        message = gr.Textbox(label="Message", placeholder="Ask something, then Send")
        with gr.Row():
            send_btn = gr.Button("Send", variant="primary")
            more_btn = gr.Button("Continue the answer")
            stop_btn = gr.Button("Stop")
            clear_btn = gr.Button("Clear")
        with gr.Row():
            length = gr.Slider(1, MAX_TURN_TOKENS, 128, step=1, label="Max new tokens")
            temperature = gr.Slider(0, 2, 0.7, step=0.05, label="Temperature")
            seed = gr.Textbox("", label="Seed (blank: random)")
            model = gr.Dropdown(choices(), value="base model", label="Model",
                                allow_custom_value=True)
        settings = [system, length, temperature, seed, model]
        sent = send_btn.click(send, [message, bot] + settings, bot, api_name="chat",
                              **ctx.model_event("generate"))
        sent.then(lambda: "", None, message, api_visibility="private")
        went_on = more_btn.click(continue_answer, [bot] + settings, bot,
                                 api_name="chat_continue", **ctx.model_event("generate"))
        stop_btn.click(None, cancels=[sent, went_on], api_visibility="private")
        clear_btn.click(lambda: [], None, bot, api_visibility="private")
        model.focus(lambda: gr.update(choices=choices()), None, model, api_visibility="private")
