"""Issue 18 item 1 through the running app: an operator-listed model loads into a role on the
Models tab, /models lists it, and Zero-shot answers with it; loading is refused where the
operator did not allow it, and a bad --models file stops the app at start with a message."""

import json
import time

import pytest
from gradio_client import Client, handle_file

import app as app_module
from appclient import launch, perturbed_copy, tuned_clip


@pytest.fixture(scope="module")
def other_clip(tmp_path_factory):
    return tuned_clip(tmp_path_factory.mktemp("clips") / "my-clip", seed=1)


@pytest.fixture(scope="module")
def served(other_clip, tmp_path_factory):
    listing = tmp_path_factory.mktemp("ops") / "models.json"
    listing.write_text(json.dumps({"dual_encoder": [str(other_clip)]}))
    demo, ctx, url = launch(["--kit", "tiny", "--no-warm", "--models", str(listing)])
    client = Client(url, verbose=False)
    yield ctx, client
    client.close()
    demo.close()


def zero_shot_both(client, name, photo, folder, threshold) -> tuple:
    """(the label rows the app gives with the loaded model `name`, the cosine ranking of the
    same folder's model loaded directly)."""
    import mmcore

    labels = "a cat, a rocket, a cup of coffee"
    _, table, _ = client.predict(handle_file(str(photo)), labels, "a photo of {}.", False,
                                 "cosine", threshold, f"loaded: {name}", api_name="/zero_shot")
    want = mmcore.load_kit("tiny", dual_encoder=str(folder)).zero_shot(
        str(photo), ["a cat", "a rocket", "a cup of coffee"], score="cosine")
    return [r for r in table["data"] if r[0] in labels], want          # not "none of these"


def test_a_listed_model_loads_and_answers_in_zero_shot(served, other_clip, chelsea, tmp_path):
    ctx, client = served
    listed = [r for r in client.predict(api_name="/models") if r["kind"] == "run-time"]
    assert [(r["role"], r["status"]) for r in listed] == [("dual_encoder", "not loaded")]
    name = listed[0]["model"]
    assert str(other_clip.parent) not in json.dumps(listed)        # no server path shown
    assert "for dual_encoder" in client.predict("dual_encoder", name, api_name="/load_model")
    deadline = time.time() + 120
    while True:
        rows = [r for r in client.predict(api_name="/models") if r["kind"] == "run-time"]
        if rows[0]["status"] == "ready":
            break
        assert not rows[0]["status"].startswith("error"), rows
        assert time.time() < deadline
        time.sleep(0.5)
    photo = tmp_path / "cat.png"
    chelsea.save(photo)
    rows, want = zero_shot_both(client, name, photo, other_clip, threshold=0.5)
    assert [r[0] for r in rows] == [lab for lab, _ in want]
    assert [r[1] for r in rows] == pytest.approx([v for _, v in want], abs=1e-4)
    base = ctx.kit.zero_shot(str(photo), ["a cat", "a rocket", "a cup of coffee"],
                             score="cosine")
    assert [v for _, v in base] != pytest.approx([v for _, v in want], abs=1e-4)


def test_unlisted_models_are_refused(served):
    ctx, client = served
    for role, source in (("causal_lm", "distilgpt2"), ("dual_encoder", "/etc"),
                         ("painter", "gpt2")):
        with pytest.raises(Exception) as err:
            client.predict(role, source, api_name="/load_model")
        message = str(err.value)
        assert ("Loading models is off" in message if role != "painter"
                else "painter is not in the list of choices" in message)


def test_a_bad_models_file_stops_the_app_with_a_message(tmp_path, capsys):
    bad = tmp_path / "models.json"
    bad.write_text('{"painter": ["x"]}')
    assert app_module.main(["--kit", "tiny", "--models", str(bad)]) == 2
    assert "unknown role 'painter'" in capsys.readouterr().err


def test_a_loaded_causal_lm_generates_in_the_generate_tab(served, tmp_path):
    """The Generate tab's model menu picks a causal LM loaded at run time; its output and its
    copy-as-code are that model's."""
    import mmcore
    from mmcore.dual_encoder import public_name

    ctx, client = served
    folder = perturbed_copy("gpt2", tmp_path / "my-gpt2")
    ctx.pool.allowed["causal_lm"] = [str(folder)]
    ctx.pool.request("causal_lm", str(folder), wait=True)
    choice = f"loaded: {public_name(str(folder))}"
    text, stats, tokens, code = client.predict("the cat", 8, 0.0, 0, 1.0, 1.0, "1", "", "auto",
                                               choice, api_name="/generate")
    want = mmcore.load_kit("tiny", causal_lm=str(folder)).generate("the cat", max_new_tokens=8)
    assert text == want != ctx.kit.generate("the cat", max_new_tokens=8)
    assert f"causal_lm={public_name(str(folder))!r}" in code


def test_a_fine_tuned_zip_loads_where_the_operator_allows_it(served, other_clip, tmp_path,
                                                             chelsea):
    """Issue 15 finding 10 / issue 18 item 1: the .zip the Fine-tune tab gives loads back
    into the app as a dual encoder (checked against the base model first); refused where
    loading is off, and a zip of something else is refused with a message."""
    import shutil
    import zipfile

    ctx, closed_client = served
    made = shutil.make_archive(str(tmp_path / "tuned"), "zip", other_clip)
    with pytest.raises(Exception, match="Loading models is off"):
        closed_client.predict(handle_file(made), api_name="/load_finetuned_zip")
    demo, ctx2, url = launch(["--kit", "tiny", "--no-warm", "--allow-model-loading"])
    client = Client(url, verbose=False)
    try:
        junk = tmp_path / "junk.zip"
        with zipfile.ZipFile(junk, "w") as zf:
            zf.writestr("notes.txt", "hello")
        with pytest.raises(Exception, match="holds no dual encoder"):
            client.predict(handle_file(str(junk)), api_name="/load_finetuned_zip")
        said = client.predict(handle_file(made), api_name="/load_finetuned_zip")
        assert "pick it as" in said
        deadline = time.time() + 120
        while True:
            rows = [r for r in client.predict(api_name="/models") if r["kind"] == "run-time"]
            if rows and rows[0]["status"] == "ready":
                break
            assert time.time() < deadline, rows
            time.sleep(0.5)
        name = rows[0]["model"]
        assert name.startswith("tuned-") and str(tmp_path) not in name
        photo = tmp_path / "cat.png"
        chelsea.save(photo)
        got, want = zero_shot_both(client, name, photo, other_clip, threshold=0)
        assert [r[1] for r in got] == pytest.approx([v for _, v in want], abs=1e-4)
    finally:
        client.close()
        demo.close()


def test_loaded_masked_lm_and_nsp_models_answer_in_the_fill_mask_tab(served, tmp_path):
    """Fill mask & NSP's model menus pick a BERT loaded at run time for either role."""
    import mmcore
    from mmcore.dual_encoder import public_name

    ctx, client = served
    folder = perturbed_copy("bert", tmp_path / "my-bert", noise=0.2,
                            model_class="AutoModelForPreTraining")     # both heads, as saved
    for role in ("masked_lm", "next_sentence"):
        ctx.pool.allowed[role] = [str(folder)]
        ctx.pool.request(role, str(folder), wait=True)
        assert ctx.pool.status(role, str(folder)) == "ready"
    choice = f"loaded: {public_name(str(folder))}"
    mine = mmcore.load_kit("tiny", masked_lm=str(folder), next_sentence=str(folder))
    *_, per_mask, _ = client.predict("the cat sat on the [MASK] .", 3, "", choice,
                                     api_name="/fill_mask")
    want = mine.fill_mask("the cat sat on the [MASK] .", 3)[0]
    assert [r[1] for r in per_mask["data"]] == [w["token_str"] for w in want]
    p_ab, _ = client.predict("the cat sat .", "it slept .", choice, api_name="/next_sentence")
    assert p_ab == pytest.approx(mine.next_sentence("the cat sat .", "it slept ."), abs=1e-5)
    assert p_ab != pytest.approx(ctx.kit.next_sentence("the cat sat .", "it slept ."), abs=1e-5)
