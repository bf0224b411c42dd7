"""Right answers through the running app (issue 12): the UI shows what mmcore computes, with
the same meaning. The app runs the tiny kit in-process, driven through gradio_client."""

import pytest
from gradio_client import Client, handle_file

import app as app_module
from demos import launch_kwargs
from mmcore import zero_shot as Z


@pytest.fixture(scope="module")
def served(tiny_kit):
    demo, ctx = app_module.create(app_module.parse_args(["--kit", "tiny", "--no-warm"]))
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True,
                            **launch_kwargs(ctx, "127.0.0.1", None, False))
    yield ctx, Client(url, verbose=False)
    demo.close()


def test_next_sentence_returns_both_directions_as_numbers(served):
    ctx, client = served
    a, b = "the cat sat on the mat .", "then it fell asleep ."
    forward, backward = client.predict(a, b, api_name="/next_sentence")
    assert isinstance(forward, float) and isinstance(backward, float)
    assert forward == pytest.approx(ctx.kit.next_sentence(a, b), abs=1e-6)
    assert backward == pytest.approx(ctx.kit.next_sentence(b, a), abs=1e-6)


@pytest.mark.parametrize("score", Z.SCORES)
def test_zero_shot_chart_table_and_verdict_agree(served, chelsea, tmp_path, score):
    ctx, client = served
    path = tmp_path / "cat.png"
    chelsea.save(path)
    for threshold in (0.999, 0.0):
        result = ctx.kit.zero_shot_details([str(path)], "cat, dog, car", "a photo of {}.",
                                           score=score,
                                           threshold=threshold or None)[0]
        chart, table, notes = client.predict(handle_file(str(path)), "cat, dog, car",
                                             "a photo of {}.", False, score, threshold,
                                             "base model", api_name="/zero_shot")
        assert chart["label"] == table["data"][0][0] == result.verdict
        assert f"Verdict: {result.verdict}" in notes
        assert [row[0] for row in table["data"]] == [label for label, _ in result.ranked]
        if threshold:
            assert result.verdict == Z.NONE_LABEL


def raw_call(url: str, api: str, data: list) -> str:
    """A queue call over plain HTTP, as a hostile client sends it (JSON with NaN and
    Infinity, which gradio_client refuses to send): the text of the error event."""
    import json

    import httpx

    base = url.rstrip("/") + f"/gradio_api/call/{api}"
    body = json.dumps({"data": data})                    # allow_nan: NaN / Infinity literals
    event = httpx.post(base, content=body, headers={"Content-Type": "application/json"},
                       timeout=30).json()["event_id"]
    with httpx.stream("GET", f"{base}/{event}", timeout=120) as reply:
        return "".join(reply.iter_text())


@pytest.mark.parametrize("api, args, message", [
    ("attention", ["the cat sat", None, float("nan"), 0], "Layer must be a finite number"),
    ("attention", ["the cat sat", None, 1, float("nan")], "Head must be a finite number"),
    ("generate", ["the cat", 5, 0, 0, 1, 1, "inf", "", "auto", "base model"], "Seed must be a finite number"),
    ("generate", ["the cat", 5, 0, 0, 1, 1, "1e400", "", "auto", "base model"], "Seed must be a finite number"),
    ("fill_mask", ["the [MASK] sat .", float("nan"), "", "base model"], "Top k must be a finite number"),
])
def test_numbers_a_client_can_send_get_clear_messages(served, api, args, message):
    from mmcore import attention

    ctx, client = served
    if api == "attention":
        args[1] = list(attention.choices(ctx.kit))[0]
    reply = raw_call(client.src, api, args)
    assert "event: error" in reply and message in reply, reply[-500:]


def test_error_messages_reach_api_clients_as_plain_text(served):
    """Quotes in a message come through as written (not &#x27;); only <, > and & are escaped,
    because the browser renders error text as HTML."""
    ctx, client = served
    reply = raw_call(client.src, "generate", ["the cat", 5, 0, 0, 1, 1, "abc", "", "auto", "base model"])
    assert "Seed must be a number, not 'abc'." in reply and "&#x27;" not in reply
