"""Conversations for chat-template models: checked messages rendered by the model's own
template, for the Generate tab's chat mode and the OpenAI-compatible chat endpoint.

    prompt = chat.render(tok, [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi!"}])
    kit.generate(prompt, chat=False)          # the prompt is already the rendered template

`render(..., continue_last=True)` leaves the last assistant message open, so generation goes
on inside it ("Continue"), as transformers' `continue_final_message` does.
"""

from .errors import InputError
from .text import clean_text

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 256
NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def check(messages) -> list:
    """[{"role", "content"}] with known roles and text content; InputError otherwise.
    Extra keys (e.g. Gradio's "metadata") are dropped."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("'messages' must be a non-empty list.")
    if len(messages) > MAX_MESSAGES:
        raise InputError(f"At most {MAX_MESSAGES} messages.")
    clean = []
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ROLES
                and isinstance(m.get("content"), (str, list))):
            raise InputError("Each message needs a role (system, user or assistant) and text "
                             "content.")
        clean.append({"role": m["role"], "content": clean_text(_text(m["content"]),
                                                               "A message", allow_empty=True)})
    return clean


def _text(content) -> str:
    """A message's text: a string, or OpenAI's list of parts when all are text parts
    ({"type": "text", "text": ...}), joined by newlines as vLLM does."""
    if isinstance(content, str):
        return content
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
               for p in content):
        raise InputError("A message's content is text, or a list of text parts only "
                         '({"type": "text", "text": ...}): this server reads no images.')
    return "\n".join(p["text"] for p in content)


def has_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def render(tok, messages, continue_last: bool = False) -> str:
    """The conversation as the model's chat template renders it, ending where the assistant
    speaks next (or inside the last assistant message with `continue_last`). A model without
    a template gets a plain "User: ... / Assistant:" transcript."""
    messages = check(messages)
    if continue_last and messages[-1]["role"] != "assistant":
        raise InputError("Continue needs the last message to be the assistant's.")
    if has_template(tok):
        if continue_last:
            return tok.apply_chat_template(messages, tokenize=False,
                                           continue_final_message=True)
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{NAMES[m['role']]}: {m['content']}" for m in messages]
    return "\n".join(lines) if continue_last else "\n".join(lines) + "\nAssistant:"
