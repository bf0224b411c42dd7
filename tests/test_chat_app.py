"""Chat mode in the Generate tab (issue 18 item 5) through the running app: the answer is
the model's continuation of the conversation as its chat template (or transcript) renders
it; Continue goes on inside the last answer; bad histories get a message."""

import pytest

from appclient import served_client
from mmcore import chat


@pytest.fixture(scope="module")
def served():
    with served_client() as served:
        yield served


def text_of(message) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def test_send_and_continue_equal_the_model_on_the_rendered_conversation(served, tiny_kit):
    ctx, client = served
    tok = tiny_kit.model("causal_lm").tokenizer
    history = client.predict("hello there", [], "Be brief.", 12, 0, "1", "base model",
                             api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant"]
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    want = tiny_kit.generate(chat.render(tok, convo), max_new_tokens=12, chat=False)
    assert text_of(history[-1]) == want
    more = client.predict(history, "Be brief.", 6, 0, "1", "base model",
                          api_name="/chat_continue")
    convo.append({"role": "assistant", "content": want})
    extra = tiny_kit.generate(chat.render(tok, convo, continue_last=True), max_new_tokens=6,
                              chat=False)
    assert len(more) == 2 and text_of(more[-1]) == want + extra


def test_bad_chat_requests_get_messages(served):
    _, client = served
    with pytest.raises(Exception, match="Nothing to continue"):
        client.predict([], "", 4, 0, "", "base model", api_name="/chat_continue")
    with pytest.raises(Exception, match="Message is empty"):
        client.predict("   ", [], "", 4, 0, "", "base model", api_name="/chat")
    with pytest.raises(Exception, match="No model named"):
        client.predict("hi", [], "", 4, 0, "", "gpt-9", api_name="/chat")


def test_chat_sends_updates_paced_not_per_piece(served, tiny_kit):
    """As Generate: an update when one is due, not one per streamed piece; the last whole."""
    ctx, client = served
    tok = tiny_kit.model("causal_lm").tokenizer
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    pieces = list(tiny_kit.stream(chat.render(tok, convo), max_new_tokens=200, chat=False))
    assert len(pieces) > 100
    job = client.submit("hi", [], "Be brief.", 200, 0, "1", "base model", api_name="/chat")
    history = job.result()
    assert text_of(history[-1]) == "".join(pieces)
    assert len(job.outputs()) < len(pieces) / 4
