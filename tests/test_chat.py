"""Chat conversations rendered by the model's own template (SmolLM2's, from the offline kit's
package), checked against transformers' apply_chat_template, and bad messages refused."""

import pytest

from mmcore import InputError, chat

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue"}]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from mmcore import offline

    return AutoTokenizer.from_pretrained(offline.smollm2_folder(), local_files_only=True)


def test_render_equals_the_models_own_template(smol_tokenizer):
    tok = smol_tokenizer
    messages = CONVERSATION[:2]
    assert chat.render(tok, messages) == tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    extra = [{**m, "metadata": {"title": None}} for m in messages]      # Gradio's extra keys
    assert chat.render(tok, extra) == chat.render(tok, messages)


def test_continue_leaves_the_last_answer_open(smol_tokenizer):
    text = chat.render(smol_tokenizer, CONVERSATION, continue_last=True)
    assert text.endswith("Blue")
    closed = chat.render(smol_tokenizer, CONVERSATION)
    assert closed.startswith(text) and len(closed) > len(text)


def test_a_model_without_a_template_gets_a_transcript():
    from transformers import AutoTokenizer

    from mmcore import tiny

    tok = AutoTokenizer.from_pretrained(tiny.folder("gpt2"))
    assert not chat.has_template(tok)
    assert chat.render(tok, CONVERSATION[:2]) == "System: Be brief.\nUser: Name a colour.\nAssistant:"
    assert chat.render(tok, CONVERSATION, continue_last=True).endswith("Assistant: Blue")


def test_text_parts_are_content_as_openai_sends_them(smol_tokenizer):
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name a"},
                                          {"type": "text", "text": "colour."}]}]
    plain = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Name a\ncolour."}]
    assert chat.render(smol_tokenizer, parts) == chat.render(smol_tokenizer, plain)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "text parts only"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text parts only"),
    ([{"role": "user", "content": ["hi"]}], "text parts only"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "tool", "content": "x"}], "needs a role"),
    ([{"role": "user", "content": 3}], "needs a role"),
    ([{"role": "user", "content": "\ud800"}], "invalid character"),
    ([{"role": "user", "content": "hi"}] * 300, "At most 256"),
])
def test_bad_messages_are_refused(smol_tokenizer, messages, message):
    with pytest.raises(InputError, match=message):
        chat.render(smol_tokenizer, messages)


def test_continue_needs_an_assistant_message_last(smol_tokenizer):
    with pytest.raises(InputError, match="Continue needs"):
        chat.render(smol_tokenizer, CONVERSATION[:2], continue_last=True)
