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
    time.sleep(1.0)                                         # the generations are streaming
    click = queue_call(url, "fill_mask", ["the cat sat on the [MASK] .", 5, "", "base model"])
    answered = time.monotonic()
    for t in runs:
        t.join()
    assert click.success, click
    ranks = [m["rank"] for m in click.messages if m.get("msg") == "estimation"]
    assert all(r == 0 for r in ranks), ranks                # nobody ahead in its lane
    assert answered < min(ended.values()), "the click waited for the generations"
