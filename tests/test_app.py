"""The app shell, launched in-process on the tiny kit and driven through gradio_client."""

import html
import time

import gradio as gr
import httpx
import pytest
from gradio_client import Client

import app as app_module
import mmcore
from demos import context, launch_kwargs


@pytest.fixture(scope="module")
def served(tiny_kit, tmp_path_factory):
    args = app_module.parse_args(["--kit", "tiny", "--data-dir",
                                  str(tmp_path_factory.mktemp("data"))])
    demo, ctx = app_module.create(args)
    ctx.start_warming()
    kwargs = launch_kwargs(ctx, "127.0.0.1", None, False)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **kwargs)
    yield demo, ctx, url
    demo.close()
    ctx.kit.stop_serving()          # the kit is shared with other tests: one call at a time


def test_app_answers_through_gradio_client(served):
    demo, ctx, url = served
    client = Client(url, verbose=False)
    info = client.predict(api_name="/kit_info")
    assert info["kit"] == "tiny"
    assert [r["role"] for r in info["roles"]] == list(mmcore.ROLES)
    table = client.predict(api_name="/load_all")
    assert [row[4] for row in table["data"]] == ["ready"] * 4
    assert {row[1] for row in table["data"]} >= {"tiny random GPT-2", "tiny random CLIP"}


def test_header_names_kit_models_and_licences(served):
    demo, ctx, url = served
    ctx.kit.warm()
    from demos import models

    header = models.header_markdown(ctx)
    assert "kit `tiny`" in header
    for row in ctx.kit.describe():
        assert row["name"] in header and row["licence"] in header
    assert header.count("· ready") == 4


def test_launch_is_hardened(served):
    demo, ctx, url = served
    assert demo.api_open is False
    assert demo._queue.max_size == ctx.queue_size
    kwargs = launch_kwargs(ctx, "127.0.0.1", 7860, False)
    assert kwargs["ssr_mode"] is False and kwargs["enable_monitoring"] is False
    assert kwargs["max_file_size"] and kwargs["allowed_paths"] == []
    assert demo.analytics_enabled is False
    # REST routes may not skip the queue, and monitoring is closed
    direct = httpx.post(f"{url}gradio_api/run/kit_info", json={"data": []}, timeout=10)
    assert direct.status_code >= 400
    assert httpx.get(f"{url}monitoring", timeout=10).status_code >= 400


def test_default_host_is_loopback():
    assert app_module.parse_args([]).host == "127.0.0.1"
    assert app_module.parse_args([]).kit in mmcore.KIT_NAMES


def test_kit_from_environment(monkeypatch):
    monkeypatch.setenv("MMCORE_KIT", "tiny")
    assert app_module.parse_args([]).kit == "tiny"


def test_guard_escapes_user_errors_and_hides_internal_ones():
    @context.guarded
    def bad_input():
        raise mmcore.InputError("bad <script>alert(1)</script>")

    @context.guarded
    def bug():
        raise KeyError("secret internals")

    @context.guarded
    def stream():
        yield 1
        raise mmcore.InputError("<b>no</b>")

    with pytest.raises(gr.Error) as err:
        bad_input()
    assert err.value.message == html.escape("bad <script>alert(1)</script>")
    with pytest.raises(gr.Error) as err:
        bug()
    assert "secret" not in err.value.message and "KeyError" in err.value.message
    gen = stream()
    assert next(gen) == 1
    with pytest.raises(gr.Error) as err:
        next(gen)
    assert err.value.message == "&lt;b&gt;no&lt;/b&gt;"


def test_user_error_reaches_the_client_escaped(tiny_kit):
    with gr.Blocks() as demo:
        box = gr.Textbox()
        out = gr.Textbox()

        @context.guarded
        def fail(text):
            raise mmcore.InputError(f"cannot use {text}")

        box.submit(fail, box, out, api_name="fail")
    demo.queue(api_open=False)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        client = Client(url, verbose=False)
        with pytest.raises(Exception) as err:
            client.predict("<img src=x>", api_name="/fail")
        assert "cannot use &lt;img src=x&gt;" in str(err.value)
        assert httpx.get(url, timeout=10).status_code == 200
    finally:
        demo.close()


def test_fill_mask_tab_through_the_client(served, tmp_path):
    demo, ctx, url = served
    client = Client(url, verbose=False)
    chart, best, joint, per_mask, notes = client.predict(
        "The capital of France is [MASK].", 5, "", api_name="/fill_mask")
    want = ctx.kit.fill_mask("The capital of France is [MASK].", top_k=5)[0]
    assert chart["label"] == want[0]["token_str"]
    assert len(joint["data"]) == 5 and len(per_mask["data"]) == 5
    assert [p["token"] for p in best if p["class_or_confidence"] == "filled"] == [want[0]["token_str"]]
    with pytest.raises(Exception, match="No mask found"):
        client.predict("no mask here", 5, "", api_name="/fill_mask")
    forward, backward = client.predict("the cat sat .", "then it slept .",
                                       api_name="/next_sentence")
    assert forward == pytest.approx(ctx.kit.next_sentence("the cat sat .", "then it slept ."))
    assert backward == pytest.approx(ctx.kit.next_sentence("then it slept .", "the cat sat ."))


def test_fill_mask_batch_reports_bad_rows_and_neutralises_formulas(served, tmp_path):
    from gradio_client import handle_file

    demo, ctx, url = served
    src = tmp_path / "in.csv"
    src.write_bytes("\ufeffsentence\n=1+1 [MASK]\nno mask\n\"two\nlines [MASK]\"\n".encode("utf-8"))
    client = Client(url, verbose=False)
    path, summary = client.predict(handle_file(str(src)), 3, api_name="/fill_mask_batch")
    assert "2 filled, 1 skipped" in summary
    import csv

    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert rows[0]["sentence"].startswith("'=")          # formula neutralised
    assert "No mask found" in rows[1]["error"]
    assert rows[2]["sentence"] == "two\nlines [MASK]" and not rows[2]["error"]


def test_attention_tab_through_the_client(served):
    demo, ctx, url = served
    client = Client(url, verbose=False)
    labels = list(__import__("mmcore").attention.choices(ctx.kit))
    for label in labels:
        heat, grid, table, notes, layer, head = client.predict(
            "the cat sat on the mat", label, 2, 1, api_name="/attention")
        assert heat and grid and "2 layers × 2 heads" in notes
        assert len(table["data"]) >= 6
    with pytest.raises(Exception, match="empty"):
        client.predict("   ", labels[0], 1, 0, api_name="/attention")
    steps, weights, pe = client.predict("the cat sat", api_name="/worked_example")
    assert "(1, 2, 3, 4)" in steps and len(weights["data"]) == 3


def test_generate_streams_through_the_client(served):
    demo, ctx, url = served
    client = Client(url, verbose=False)
    job = client.submit("the cat sat", 24, 0, 0, 1, 1, "", "", "auto", api_name="/generate")
    updates = list(job)
    text, live, view, code = job.result()            # (the gr.State output is not sent)
    assert len(updates) >= 2                          # it streamed
    assert text == ctx.kit.generate("the cat sat", max_new_tokens=24)
    assert "tokens/s" in live and "time to first token" in live
    from mmcore import generation as G

    lm = ctx.kit.model("causal_lm")
    want = [t.text or " " for t in G.generate_tokens(lm.model, lm.tokenizer,
                                                      "the cat sat", G.SamplingParams(24))]
    assert [p["token"] for p in view] == want
    assert "kit.generate(" in code and "seed=" in code
    with pytest.raises(Exception, match="less than minimum value 1"):    # Gradio's own check
        client.predict("the cat", 0, 0, 0, 1, 1, "", "", "auto", api_name="/generate")
    with pytest.raises(Exception, match="empty"):
        client.predict("   ", 5, 0, 0, 1, 1, "", "", "auto", api_name="/generate")
    with pytest.raises(Exception, match="no chat template"):
        client.predict("the cat", 5, 0, 0, 1, 1, "", "", "chat template", api_name="/generate")


def test_zero_shot_tab_through_the_client(served, tmp_path):
    from gradio_client import handle_file
    from PIL import Image
    from skimage import data

    demo, ctx, url = served
    path = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()).save(path)
    client = Client(url, verbose=False)
    chart, table, notes = client.predict(handle_file(str(path)), "cat, dog, cat", "a photo of {}.",
                                         False, "softmax", 0, "base model",
                                         api_name="/zero_shot")
    want = ctx.kit.zero_shot(str(path), ["cat", "dog"])
    assert chart["label"] == want[0][0]
    assert [row[0] for row in table["data"]] == [w[0] for w in want]
    assert "duplicate" in notes
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(Exception, match="not an image"):
        client.predict(handle_file(str(bad)), "cat", "a photo of {}.", False, "softmax", 0,
                       "base model", api_name="/zero_shot")
    rows, csv_path, note = client.predict([handle_file(str(path)), handle_file(str(bad))],
                                          "cat, dog", "a photo of {}.", False, "softmax",
                                          api_name="/zero_shot_batch")
    assert "1 classified, 1 skipped" in note
    assert len(rows["data"]) == 2


def test_retrieval_tab_through_the_client(served, tmp_path):
    import zipfile

    from gradio_client import handle_file
    from PIL import Image
    from skimage import data

    demo, ctx, url = served
    client = Client(url, verbose=False)                 # one client = one session = one gallery
    with pytest.raises(Exception, match="gallery is empty"):
        client.predict("a cat", None, "", 4, api_name="/search")
    status = client.predict("base model", api_name="/load_demo_gallery")
    assert "10 images in the gallery" in status
    hits, numbers = client.predict("a cat", None, "", 4, api_name="/search")
    assert len(hits) == 4
    # the results as numbers for programs (issue 18), the same as the gallery's captions
    assert [sorted(r) for r in numbers] == [["caption", "id", "score"]] * 4
    scores = [r["score"] for r in numbers]
    assert scores == sorted(scores, reverse=True) and all(isinstance(x, float) for x in scores)
    assert [h["caption"] for h in hits] == [f"{r['score']:.3f} · {r['caption'] or r['id']}"
                                            for r in numbers]
    # a zip with a good image, a zip-slip entry and junk
    Image.fromarray(data.coffee()).save(tmp_path / "c.png")
    with zipfile.ZipFile(tmp_path / "up.zip", "w") as zf:
        zf.write(tmp_path / "c.png", "more/c.png")
        zf.writestr("../escape.png", b"x")
        zf.writestr("bad.png", b"junk")
    status = client.predict([handle_file(str(tmp_path / "up.zip"))], "base model",
                            api_name="/add_images")
    assert "10 images in the gallery (0 added, 1 already there)" in status   # same coffee photo
    assert "unsafe path" in status and "bad.png" in status
    recall = client.predict(api_name="/recall")
    assert set(recall) >= {"i2t_r1", "t2i_r5"}
    # another session starts with its own empty gallery
    with pytest.raises(Exception, match="gallery is empty"):
        Client(url, verbose=False).predict("a cat", None, "", 4, api_name="/search")


def test_training_tab_through_the_client(served):
    demo, ctx, url = served
    client = Client(url, verbose=False)
    report = client.predict(None, True, api_name="/validate_training_data")
    assert "72 usable image-caption pairs" in report
    status, loss, metrics, compare, download = client.predict(
        None, True, 2, 16, 1e-3, 0.05, 0.1, "projections", 1, 0, api_name="/train")
    assert "finished" in status and download
    # loss on its own axis; accuracy and every validation recall series on the other
    steps = [row[0] for row in loss["data"]]
    assert len(steps) >= 2 and steps == list(range(1, len(steps) + 1))
    assert {row[2] for row in metrics["data"]} == {
        "in-batch accuracy", "val i2t_r1", "val t2i_r1", "val i2t_r5", "val t2i_r5"}
    assert {row[0] for row in compare["data"]} >= {"i2t_r1", "t2i_r1"}
    assert len(ctx.checkpoints) == 1
    name = next(iter(ctx.checkpoints))
    tuned = ctx.kit_for(name)
    assert tuned.encoder().identity != ctx.kit.encoder().identity
    with pytest.raises(Exception, match="batch_size must be a whole number between 2 and"):
        client.predict(None, True, 2, 1, 1e-3, 0.05, 0.1, "projections", 1, 0, api_name="/train")


def lanes_of(demo) -> dict:
    return {fn.api_name: (fn.concurrency_id, fn.concurrency_limit) for fn in demo.fns.values()
            if isinstance(fn.api_name, str)}


def test_long_and_short_work_run_in_separate_lanes(served):
    demo, ctx, url = served
    lanes = lanes_of(demo)
    assert ctx.kit.scheduler() is not None                    # generation is batched
    assert lanes["generate"] == ("generate", ctx.kit.serving.max_batch)
    for name in ("fill_mask", "next_sentence", "zero_shot", "search", "attention"):
        assert lanes[name][0] == "short", name
    for name in ("fill_mask_batch", "zero_shot_batch", "add_images", "load_demo_gallery"):
        assert lanes[name][0] == "long", name
    assert lanes["train"][0] == "train"


def test_batching_off_is_one_slot_for_every_model_event(tiny_kit):
    was = tiny_kit.serving
    args = app_module.parse_args(["--kit", "tiny", "--batching", "off"])
    try:
        demo, ctx = app_module.create(args)
        assert tiny_kit.scheduler() is None
    finally:
        if was is not None:
            tiny_kit.serve(was)                 # the served app of this module goes on
    groups = {lane for name, lane in lanes_of(demo).items()
              if name in ("generate", "fill_mask", "fill_mask_batch", "zero_shot", "search")}
    assert groups == {(context.MODEL_GROUP, 1)}


def test_a_short_request_is_answered_while_a_long_generation_runs(served):
    demo, ctx, url = served
    client = Client(url, verbose=False)
    job = client.submit("the cat sat", 1000, 0, 0, 1, 1, "", "", "auto", api_name="/generate")
    while not job.status().code.name == "ITERATING":        # it is streaming now
        assert not job.done()
        time.sleep(0.01)
    chart, *_ = client.predict("The capital of France is [MASK].", 5, "", api_name="/fill_mask")
    assert chart["label"] and not job.done()
    assert ctx.kit.scheduler().load()["active"] == 1
    job.cancel()
