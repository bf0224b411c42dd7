"""Compare tab through the running app (issue 18 item 2): two models, or one model with two
settings, on one input; each side equals that model's own answer, and the marks say what
differs."""

import pytest
from gradio_client import handle_file

import mmcore
from appclient import served_client, tuned_clip


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with served_client() as (ctx, client):
        folder = tuned_clip(tmp_path_factory.mktemp("tuned") / "tuned-clip", seed=2)
        ctx.checkpoints["tuned-clip"] = str(folder)
        yield ctx, client, folder


def test_generate_two_temperatures_of_one_model(served, tiny_kit):
    ctx, client, _ = served
    a, b, summary = client.predict("the cat", "base model", "base model", 0.0, 1.5, 16, 3,
                                   api_name="/compare_generate")
    text_a = "".join(t["token"] for t in a)
    assert text_a == tiny_kit.generate("the cat", max_new_tokens=16)     # A: greedy
    text_b = "".join(t["token"] for t in b)
    assert text_b == tiny_kit.generate("the cat", max_new_tokens=16, temperature=1.5, seed=3)
    marked = [t for t in b if t["class_or_confidence"] == "changed"]
    assert (text_a == text_b) == (not marked)
    assert "first difference" in summary or "identical" in summary
    same = client.predict("the cat", "base model", "base model", 0.0, 0.0, 8, 0,
                          api_name="/compare_generate")
    assert "identical" in same[2] and not any(t["class_or_confidence"] for t in same[1])


def test_zero_shot_base_against_fine_tuned(served, tmp_path, chelsea):
    ctx, client, folder = served
    photo = tmp_path / "cat.png"
    chelsea.save(photo)
    labels = "a cat, a rocket, a cup of coffee"
    table, summary = client.predict(handle_file(str(photo)), labels, "base model",
                                    "tuned-clip", "a photo of {}.", "a photo of {}.",
                                    api_name="/compare_zero_shot")
    base = ctx.kit.zero_shot(str(photo), ["a cat", "a rocket", "a cup of coffee"])
    tuned = mmcore.load_kit("tiny", dual_encoder=str(folder)).zero_shot(
        str(photo), ["a cat", "a rocket", "a cup of coffee"])
    rows = {r[0]: r for r in table["data"]}
    for rank, (label, p) in enumerate(base, 1):
        assert rows[label][1] == rank and rows[label][2] == pytest.approx(p, abs=1e-4)
    for rank, (label, p) in enumerate(tuned, 1):
        assert rows[label][3] == rank and rows[label][4] == pytest.approx(p, abs=1e-4)
    assert [r[0] for r in table["data"]] == [label for label, _ in tuned]     # B's order
    assert base[0][0] in summary and tuned[0][0] in summary


def test_fill_mask_and_retrieval(served, tiny_kit):
    ctx, client, _ = served
    table, summary = client.predict("the cat sat on the <mask> .", "base model", "base model",
                                    3, api_name="/compare_fill_mask")
    want = tiny_kit.fill_mask("the cat sat on the [MASK] .", 3)[0]
    assert [r[1] for r in table["data"]] == [w["token_str"] for w in want]
    assert all(r[6] == "=" for r in table["data"])                  # same model: no moves
    pa, pb, _ = client.predict("the cat sat .", "it slept .", "base model", "base model",
                               api_name="/compare_next_sentence")
    assert pa == pb == pytest.approx(tiny_kit.next_sentence("the cat sat .", "it slept ."),
                                     abs=1e-4)
    rows, summary = client.predict("a cat", "base model", "tuned-clip", 4,
                                   api_name="/compare_retrieval")
    kept = [r for r in rows["data"] if r[5] == "in both"]
    assert f"overlap@4: **{len(kept) / 4:.0%}**" in summary
    assert len(kept) + sum(r[5] == "gained by B" for r in rows["data"]) == 4


def test_bad_input_gets_a_message(served):
    _, client, _ = served
    with pytest.raises(Exception, match="No model named"):
        client.predict("x", "gpt-9", "base model", 0, 0, 4, 0, api_name="/compare_generate")
    with pytest.raises(Exception, match="Upload an image"):
        client.predict(None, "a cat, a dog", "base model", "base model", "a {}", "a {}",
                       api_name="/compare_zero_shot")
