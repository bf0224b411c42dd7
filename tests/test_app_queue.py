"""Queue feedback (issue 15 finding 13): a short click made while other users generate is
not queued behind them. Short work has its own lane (issue 16), so the position Gradio
reports for it counts only short work (0 here), and it answers while the generations still
stream: the position and the wait shown are the real ones."""

import threading
import time

import pytest

from appclient import launch, queue_call


@pytest.fixture(scope="module")
def served():
    demo, ctx, url = launch(["--kit", "tiny", "--no-warm"])
    yield ctx, url
    demo.close()


def test_a_short_click_does_not_wait_behind_generations(served):
    ctx, url = served
    ctx.kit.fill_mask("the [MASK] sat .")                  # loaded: the click is short work
    ended = {}

    def generate(i):
        queue_call(url, "generate", ["the cat", 1000, 0, 0, 1, 1, str(i), "", "auto",
                                     "base model"], timeout=600)
        ended[i] = time.monotonic()

    runs = [threading.Thread(target=generate, args=(i,)) for i in range(3)]
    for t in runs:
        t.start()
    end = time.monotonic() + 120        # until all three stream (counted from their first
    while ctx.streams.count < 3 and not ended:              # token: what paces updates)
        assert time.monotonic() < end, "the generations never all streamed"
        time.sleep(0.005)
    assert not ended, "a generation ended before all three streamed"
    click = queue_call(url, "fill_mask", ["the cat sat on the [MASK] .", 5, "", "base model"])
    answered = time.monotonic()
    for t in runs:
        t.join()
    assert ctx.streams.count == 0, "a stream that ended is still counted"
    assert click.success, click
    ranks = [m["rank"] for m in click.messages if m.get("msg") == "estimation"]
    assert all(r == 0 for r in ranks), ranks                # nobody ahead in its lane
    assert answered < min(ended.values()), "the click waited for the generations"


def test_streamed_updates_thin_out_as_streams_share_the_server():
    """Each streamed update costs the server CPU (Gradio postprocesses, diffs and sends it)
    that decoding needs: bench_serving, 8 users, 72 tok/s at a text update per stream every
    0.1 s against 75-82 at 0.4 s. The running streams share a budget of updates a second:
    alone or in pairs every 0.1 s, eight every 0.4 s, never rarer than the token view's 1 s."""
    import contextlib

    from demos.context import Pacer, Streams

    streams = Streams(budget=20.0)
    pace = Pacer(0.1, lambda: streams.interval(0.1, 1.0))
    assert streams.interval(0.1, 1.0) == 0.1 and streams.count == 0
    with contextlib.ExitStack() as stack:
        for _ in range(2):
            stack.enter_context(streams.running())
        assert streams.interval(0.1, 1.0) == 0.1
        for _ in range(6):
            stack.enter_context(streams.running())
        assert streams.count == 8 and streams.interval(0.1, 1.0) == pytest.approx(0.4)
        assert pace.due(0.0) and not pace.due(0.3) and pace.due(0.45)
        for _ in range(32):
            stack.enter_context(streams.running())
        assert streams.interval(0.1, 1.0) == 1.0
    assert streams.count == 0 and streams.interval(0.1, 1.0) == 0.1
    with pytest.raises(RuntimeError), streams.running():
        raise RuntimeError("a failed stream still leaves")
    assert streams.count == 0
