"""The API as programs see it (issue 18 item 3): every output is named, optional inputs are
optional (a call may leave them out), and errors are plain text."""

import pytest

from appclient import served_client

OPTIONAL = {"/generate": {"seed", "stop"}, "/fill_mask": {"targets"},
            "/fill_mask_batch": {"file"}, "/next_sentence_batch": {"file"},
            "/zero_shot": {"image"}, "/zero_shot_batch": {"files"},
            "/search": {"query", "image", "negative"}, "/add_images": {"files"},
            "/load_index": {"file"}, "/validate_training_data": {"file"}, "/train": {"file"}}


@pytest.fixture(scope="module")
def client():
    with served_client() as served:
        yield served


def test_every_output_is_named_and_optional_inputs_are_optional(client):
    _, c = client
    info = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
    unnamed = {name: [r["label"] for r in ep["returns"] if r["label"].startswith("value_")]
               for name, ep in info.items()}
    assert not {k: v for k, v in unnamed.items() if v}, unnamed
    for name, params in OPTIONAL.items():
        has_default = {p["parameter_name"]: p["parameter_has_default"]
                       for p in info[name]["parameters"]}
        assert all(has_default[p] for p in params), (name, has_default)


def test_calls_may_leave_optional_inputs_out(client, tiny_kit):
    _, c = client
    out = c.predict("the cat", 8, 0.0, api_name="/generate")     # seed, stop, ... left out
    # the rest take the tab's defaults (top-k 50, top-p 0.95, repetition penalty 1.1)
    assert out[0] == tiny_kit.generate("the cat", max_new_tokens=8, top_k=50, top_p=0.95,
                                       repetition_penalty=1.1)
    chart, best, joint, per_mask, notes = c.predict("the cat sat on the [MASK] .",
                                                    api_name="/fill_mask")
    want = tiny_kit.fill_mask("the cat sat on the [MASK] .", 5)[0]
    assert [r[1] for r in per_mask["data"]] == [w["token_str"] for w in want]
    with pytest.raises(Exception, match="Upload an image"):
        c.predict(api_name="/zero_shot")


def test_generate_sends_updates_paced_not_per_token(client, tiny_kit):
    """Generate sends an update when one is due (~every 0.1 s), not one per token: each
    update's work in the server slows the decoding thread. The last update is whole."""
    ctx, c = client
    job = c.submit("Once upon a time", 200, 0, 0, 1, 1, "", "", "plain continuation",
                   api_name="/generate")
    text, stats, *_ = job.result()
    n = int(stats.split(" tokens")[0])
    assert n == 200 and len(job.outputs()) < n / 4
    assert text == tiny_kit.generate("Once upon a time", max_new_tokens=200, chat=False)

