"""Each tab's main flow, driven in a real browser (Debian's headless Chromium) as a person would,
asserting what they would see; plus one phone-sized pass.

One app launch and one browser serve every test (module fixtures); each test opens its own
page (a fresh session). Skips, saying why, where Chromium or Playwright is absent; `.ci/run`
installs Chromium so CI always runs it. Screenshots of each tab after its flow land in
artifacts/ (the README shows them).
"""

import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest

import app as app_module
from demos import TABS, launch_kwargs
from demos.train import METRICS

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = os.environ.get("MMCORE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# The closed network refuses Chromium's background connections; these flags stop it trying.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
WAIT = 60_000   # ms; two shared cores, models loading in the background


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(tiny_kit):
    """(url, ctx) of one app on the tiny kit, for every test here."""
    demo, ctx = app_module.create(app_module.parse_args(["--kit", "tiny"]), tiny_kit)
    ctx.start_warming()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True,
                            **launch_kwargs(ctx, "127.0.0.1", None, False))
    yield url, ctx
    demo.close()


def open_app(browser, served, width=1400, height=1000):
    """A fresh page (its own session) on the app, with page errors collected."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.goto(served[0], wait_until="domcontentloaded")
    page.get_by_text("kit tiny").first.wait_for(timeout=WAIT)
    return page


def tab(page, title):
    """Open a tab (from the "More tabs" menu on a narrow screen); returns its panel."""
    direct = page.get_by_role("tab", name=title, exact=True)
    more = page.get_by_role("button", name="More tabs")
    direct.or_(more).first.wait_for()               # the tab bar may be re-laid out
    if direct.count():
        direct.click()
    else:
        more.click()
        page.locator(".overflow-dropdown button", has_text=title).click()
    panel = page.locator("[role=tabpanel]:visible").first
    panel.wait_for()
    return panel


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    assert not page.errors, page.errors


def wait_text(page, pattern, timeout=WAIT):
    """Wait until the page's visible text matches `pattern` (a regex); returns the match."""
    try:
        page.wait_for_function("(p) => new RegExp(p).test(document.body.innerText)",
                               arg=pattern, timeout=timeout)
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "failed.png"), full_page=True)
        raise AssertionError(f"never on screen: {pattern!r} (artifacts/failed.png)") from None
    return re.search(pattern, page.locator("body").inner_text())


def caption_zip(folder: Path, n: int) -> Path:
    """A .zip of `n` coloured squares with a captions.csv."""
    from PIL import Image

    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    path = folder / "pairs.zip"
    with zipfile.ZipFile(path, "w") as zf:
        rows = ["image,caption"]
        for i in range(n):
            Image.new("RGB", (48, 48), colours[i % len(colours)]).save(folder / f"{i}.png")
            zf.write(folder / f"{i}.png", f"{i}.png")
            rows.append(f"{i}.png,a {colours[i % len(colours)]} square number {i}")
        zf.writestr("captions.csv", "\n".join(rows) + "\n")
    return path


def test_every_tab_renders(browser, served):
    page = open_app(browser, served)
    for t in TABS:
        panel = tab(page, t.TITLE)
    # the Models tab (the last) lists every role once the background warm-up finishes
    panel.get_by_text("tiny random CLIP").first.wait_for(timeout=WAIT)
    page.wait_for_function("() => document.body.innerText.split('ready').length > 4",
                           timeout=WAIT)
    # each loaded model's memory, dtype, device and load time; Refresh says it refreshed
    page.get_by_role("button", name="Refresh", exact=True).click()
    wait_text(page, r"Refreshed at \d\d:\d\d:\d\d")
    text = panel.inner_text()
    assert len(re.findall(r"\d[\d.,]* MB", text)) >= 4 and "float32" in text and "cpu" in text
    assert len(re.findall(r"\d+\.\d s", text)) >= 4
    shot(page, "models")
    page.close()


def test_fine_tune_flow(browser, served, tmp_path):
    page = open_app(browser, served)
    panel = tab(page, "Fine-tune")
    # an upload selects the upload: its 6 pairs are validated, not the demo set
    panel.locator("input[type=file]").first.set_input_files(str(caption_zip(tmp_path, 6)))
    page.get_by_role("button", name="Validate the data").click()
    wait_text(page, r"\d+ usable image-caption pairs")
    assert "Data: your upload. 6 usable image-caption pairs" in panel.inner_text()
    # the demo set is a button of its own
    page.get_by_role("button", name=re.compile("Use the demo set")).click()
    wait_text(page, r"Data: the demo set\. \d+ usable")
    panel.locator("input[type=file]").first.set_input_files(str(caption_zip(tmp_path, 6)))
    page.get_by_role("button", name="Validate the data").click()
    wait_text(page, r"Data: your upload\. 6 usable")
    # train on a bigger upload; the live plots show the loss and every metric series
    panel.get_by_role("button", name="Clear").first.click()      # the x on the last upload
    panel.locator("input[type=file]").first.set_input_files(str(caption_zip(tmp_path, 24)))
    # the last report goes with its data
    page.wait_for_function("() => !document.body.innerText.includes('6 usable')")
    page.get_by_role("button", name="Validate the data").click()
    wait_text(page, r"Data: your upload\. 24 usable")
    set_number(panel, "Epochs", 100)
    set_number(panel, "Batch size", 2)
    panel.get_by_label("image", exact=True).check()      # both towers: slow enough to stop
    panel.get_by_label("Name of the fine-tuned model").fill("shapes-v1")
    page.get_by_role("button", name="Start", exact=True).click()
    wait_text(page, r"step \d+/\d+")
    plot = panel.locator(".block", has_text="Accuracy and validation recall").last
    for series in METRICS:                  # in the legend, inside the plot (not cut off)
        entry = plot.locator("svg text", has_text=series).first
        entry.wait_for(timeout=WAIT)
        box, frame = entry.bounding_box(), plot.bounding_box()
        assert box["y"] + box["height"] <= frame["y"] + frame["height"], series
    page.get_by_role("button", name="Stop", exact=True).click()
    name = wait_text(page, r"(shapes-v1\S*) finished \(stopped\)").group(1)
    assert panel.locator("svg text", has_text="loss").count()
    # the download says how to load it
    with page.expect_download() as got:
        panel.locator(f"a[download='{name}.zip']").click()
    with zipfile.ZipFile(got.value.path()) as zf:
        assert "load_kit(" in zf.read("HOW-TO-LOAD.txt").decode()
    shot(page, "fine-tune")
    # the fine-tuned model classifies in the Zero-shot tab
    panel = tab(page, "Zero-shot")
    panel.locator("input[type=file]").first.set_input_files(str(tmp_path / "0.png"))
    panel.get_by_label("Labels (comma or newline separated)").fill("a red square, a blue square")
    panel.get_by_label("Dual encoder (fine-tuned ones").click()
    page.get_by_role("option", name=name).click()
    page.get_by_role("button", name="Classify", exact=True).click()
    wait_text(page, r"a red square")
    # Retrieval: a gallery built with the base model keeps its images when uploads come
    # with the fine-tuned one chosen, and says so
    panel = tab(page, "Retrieval")
    page.get_by_role("button", name="Load the demo photos").click()
    wait_text(page, r"10 images in the gallery")
    panel.get_by_label("Dual encoder for new galleries").click()
    page.get_by_role("option", name=name).click()
    panel.locator("input[type=file]").nth(0).set_input_files(str(tmp_path / "1.png"))
    page.get_by_role("button", name="Add uploads").click()
    wait_text(page, r"11 images in the gallery")
    assert panel.get_by_text("built with another model").count()
    page.close()


def set_number(panel, label, value):
    """Type into a slider's or number box's number field."""
    box = panel.get_by_label(f"number input for {label}", exact=True)
    box.fill(str(value))
    box.press("Enter")


def generate_stats(panel):
    """(tokens in the stats line, the stats line)."""
    line = panel.locator(".prose", has_text="tokens/s").first.inner_text()
    return int(re.match(r"(\d+) tokens", line).group(1)), line


STOP_WHILE_STREAMING = """() => new Promise(done => {
  const button = (name) => [...document.querySelectorAll('button')].find(
      b => b.innerText.trim() === name && b.offsetParent !== null && b.classList.contains('lg'));
  const line = () => document.body.innerText.match(/^(\\d{2,}|[2-9]) tokens ·(?!.*finished).*$/m);
  const over = () => document.body.innerText.match(/^\\d+ tokens ·.*finished.*$/m);
  const before = over() && over()[0];                   // the last run's line, still shown
  const ended = () => over() && over()[0] !== before && over();
  const check = () => {
    const m = line();
    if (!m && ended()) return done({disabled: null, line: ended()[0]});   // over too soon
    if (!m) return requestAnimationFrame(check);
    const disabled = button('Generate').disabled;
    button('Stop').click();
    done({disabled, line: m[0]});
  };
  check();
})"""


def test_generate_flow(browser, served):
    import mmcore

    page = open_app(browser, served)
    panel = tab(page, "Generate")
    go = page.get_by_role("button", name="Generate", exact=True)
    output = panel.get_by_label("Output")
    view = panel.locator(".token-container .token")
    # a first run, to the end
    panel.get_by_label("Prompt").fill("the sea")
    set_number(panel, "Max new tokens", 40)
    panel.get_by_label("Seed (blank").fill("7")
    go.click()
    wait_text(page, r"finished: length")
    assert view.count() == 40
    # a second, long run: Generate is disabled while it streams, tokens/s reads live
    # (greedy: the tiny random model runs all 1000 tokens; a sampled run may draw its EOS)
    panel.get_by_label("Prompt").fill("once upon a time")
    set_number(panel, "Max new tokens", 1000)
    set_number(panel, "Temperature (0 = greedy)", 0)
    go.click()
    # the moment a few tokens are on screen (in the page, so Stop lands mid-run): is Generate
    # disabled, does tokens/s read live; then Stop
    seen = page.evaluate(STOP_WHILE_STREAMING)
    assert seen["disabled"] and not re.search(r"· (0\.0|–) tokens/s", seen["line"]), seen
    wait_text(page, r"\d+ tokens · .* · stopped")
    page.wait_for_timeout(1000)             # late updates of the cancelled run change nothing
    # one consistent run, marked stopped: stats, token view and code are the stopped run's
    count, line = generate_stats(panel)
    assert 0 < count < 1000 and "stopped" in line and "finished" not in line
    assert view.count() == count
    assert "once upon a time" in panel.locator(".cm-content").inner_text()
    assert go.is_enabled()
    # click a token: its alternatives; regenerate from it with the second one
    view.nth(4).click()
    wait_text(page, r"Token 5: ")
    page.get_by_role("button", name="Regenerate from here with this alternative").click()
    wait_text(page, r"finished: ")
    # the old pick's panel goes, Generate is back
    page.wait_for_function("() => !document.body.innerText.includes('Token 5: ')")
    go.wait_for(state="visible")
    assert go.is_enabled()
    shot(page, "generate")
    # the copy-as-code reproduces the output on screen
    code = panel.locator(".cm-content").inner_text()
    shown = output.input_value()
    printed = []
    exec(code.replace("print(", "printed.append("), {"printed": printed, "mmcore": mmcore})
    assert printed == [shown]
    page.close()


def test_retrieval_flow(browser, served, tmp_path, chelsea):
    page = open_app(browser, served)
    panel = tab(page, "Retrieval")
    page.get_by_role("button", name="Load the demo photos").click()
    wait_text(page, r"10 images in the gallery")
    # adding an upload keeps the gallery
    chelsea.resize((96, 64)).save(tmp_path / "cat.png")
    panel.locator("input[type=file]").nth(0).set_input_files(str(tmp_path / "cat.png"))
    page.get_by_role("button", name="Add uploads").click()
    wait_text(page, r"11 images in the gallery")
    # text, then with a negative term; the screen says which query ran
    panel.get_by_label("Text query").fill("a cat")
    page.get_by_role("button", name="Search", exact=True).click()
    wait_text(page, r"Results for the text “a cat”")
    thumbs = panel.locator("button.thumbnail-item")
    assert thumbs.count() == 8
    labels = panel.locator(".caption-label")
    assert labels.count() == 8 and all(re.match(r"-?\d\.\d{3} · ", t) for t in
                                       labels.all_inner_texts())
    assert not panel.get_by_text("1.000 · ").count()                # no text scores 1.0
    panel.get_by_label("…but not (optional)").fill("a clock")
    page.get_by_role("button", name="Search", exact=True).click()
    wait_text(page, r"Results for the text “a cat” but not “a clock”")
    # search by a result: no preview stays open; the image itself comes first at 1.000
    name = labels.nth(3).inner_text().split(" · ", 1)[1]
    thumbs.nth(3).click()
    wait_text(page, r"Results for the image “")
    assert labels.first.inner_text() == f"1.000 · {name}"
    assert not panel.locator(".preview").count()
    assert thumbs.count() == 8
    # an uploaded query image with a typed query: the image is used, and the screen says so
    panel.locator("input[type=file]").nth(1).set_input_files(str(tmp_path / "cat.png"))
    page.get_by_role("button", name="Search", exact=True).click()
    wait_text(page, r"Results for your query image \(the typed text was not used")
    assert labels.first.inner_text().endswith(" · cat.png")
    # the results download as a table
    with page.expect_download() as got:
        panel.locator("a[download='results.csv']").click()
    rows = got.value.path().read_text().splitlines()
    assert rows[0] == "rank,score,id,caption" and len(rows) == 9 and ",cat.png," in rows[1]
    shot(page, "retrieval")
    # save the index, then load it back in a fresh session
    page.get_by_text("Save, load, export, evaluate").click()
    page.get_by_role("button", name="Save index").click()
    with page.expect_download() as saved:
        panel.locator("a[download='mmcore-index.zip']").click()
    saved.value.save_as(tmp_path / "index.zip")
    page.close()
    page = open_app(browser, served)
    panel = tab(page, "Retrieval")
    page.get_by_text("Save, load, export, evaluate").click()
    panel.locator("input[type=file]").nth(2).set_input_files(str(tmp_path / "index.zip"))
    page.get_by_role("button", name="Load index").click()
    wait_text(page, r"Loaded 11 images")
    panel.get_by_label("Text query").fill("a cat")
    page.get_by_role("button", name="Search", exact=True).click()
    wait_text(page, r"Results for the text “a cat”: 8 images")
    assert not page.errors, page.errors
    page.close()


def test_fill_mask_flow(browser, served, tmp_path):
    page = open_app(browser, served)
    panel = tab(page, "Fill mask & NSP")
    # an example, then two masks written the RoBERTa way
    panel.locator(".gallery-item, tr.tr-body, button.gallery-item").filter(
        has_text="I drink a cup of").first.click()
    page.get_by_role("button", name="Fill", exact=True).click()
    wait_text(page, r"First mask: probabilities")
    panel.get_by_label("Sentence with [MASK]").fill("The <mask> of France is <mask>.")
    page.get_by_role("button", name="Fill", exact=True).click()
    page.wait_for_function("() => document.querySelectorAll('[role=tabpanel] .token').length")
    # the joint fills' sentence column shows whole sentences, not cut off
    cell = panel.get_by_text(re.compile(r"^The \S+ of France is \S+\.$")).locator("visible=true")
    cell.first.wait_for()
    for _ in range(100):               # the table's rows render after its first (a flake)
        if cell.count() >= 5:
            break
        page.wait_for_timeout(100)
    assert cell.count() >= 5
    assert all(c.evaluate("c => c.scrollWidth <= c.clientWidth + 1") for c in cell.all())
    filled = panel.locator(".token", has_text=re.compile(r"\S")).count()
    assert filled >= 2
    # NSP: the answer reads as a sentence about the two orders
    page.get_by_role("button", name="How likely does B follow A?").click()
    wait_text(page, r"B follows A with probability 0\.\d+")
    # CSV in, CSV out (with <mask> too)
    (tmp_path / "s.csv").write_text("sentence\nParis is the <mask> of France.\n"
                                    "The [MASK] sat on the mat.\nno mask here\n")
    page.get_by_text("Batch: CSV in, CSV out").click()
    panel.locator(".block", has_text="CSV file").locator("input[type=file]").last \
        .set_input_files(str(tmp_path / "s.csv"))
    panel.get_by_text("s.csv").first.wait_for()
    page.get_by_role("button", name="Fill every sentence").click()
    wait_text(page, r"2 filled, 1 skipped")
    with page.expect_download() as got:
        panel.locator("a[download='fill_mask_results.csv']").click()
    out = got.value.path().read_text()
    assert out.count("\n") == 4 and "Paris is the " in out
    shot(page, "fill-mask")
    page.close()


def test_inside_the_transformer_flow(browser, served):
    page = open_app(browser, served)
    panel = tab(page, "Inside the Transformer")
    page.get_by_role("button", name="Show attention").click()
    wait_text(page, r"Showing layer 1, mean of all heads")
    assert panel.get_by_text("attention sink").count()       # the default view, explained
    # a layer typed and entered, then a head typed at once: neither overwrites the other
    set_number(panel, "Layer", 2)
    box = panel.get_by_label("number input for Head (0 = mean of all heads)", exact=True)
    box.fill("2")
    wait_text(page, r"Showing layer 2, mean of all heads")
    page.wait_for_timeout(500)
    assert box.input_value() == "2"                 # the layer's answer left the head alone
    page.get_by_role("button", name="Show attention").click()
    wait_text(page, r"Showing layer 2, head 2")
    assert panel.get_by_label("number input for Layer", exact=True).input_value() == "2"
    # the plots' own titles are not covered by label badges
    assert not panel.locator("[data-testid=block-label]", has_text="Attention heatmap").count()
    shot(page, "inside-the-transformer")
    page.close()


def test_phone(browser, served):
    page = open_app(browser, served, width=390, height=844)
    # the model-status header is one line, details on demand
    header = page.locator(".prose", has_text="kit tiny").first
    assert header.bounding_box()["height"] < 0.12 * 844
    page.get_by_text("models ready").first.click()
    page.get_by_text("tiny random GPT-2").first.wait_for()
    panel = tab(page, "Inside the Transformer")
    page.get_by_role("button", name="Show attention").click()
    wait_text(page, r"Showing layer 1")
    # the model box fits the screen; the head label is not one word a line
    model = panel.get_by_label("Model")
    box = model.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    assert model.evaluate("e => e.scrollWidth <= e.clientWidth + 1")      # not cut off
    label = panel.get_by_text("Head (0 = mean of all heads)").first.bounding_box()
    assert label["height"] < 30, label                                   # one line
    shot(page, "phone")
    page.close()


def test_zero_shot_flow(browser, served, tmp_path, chelsea):
    page = open_app(browser, served)
    panel = tab(page, "Zero-shot")
    chelsea.save(tmp_path / "cat.png")
    panel.locator("input[type=file]").first.set_input_files(str(tmp_path / "cat.png"))
    panel.get_by_label("Labels (comma or newline separated)").fill("a cat, a dog, a car")
    panel.get_by_text(re.compile("^Ensemble of")).first.click()
    page.get_by_role("button", name="Classify", exact=True).click()
    verdict = wait_text(page, r"Verdict: (a cat|a dog|a car)").group(1)
    # the chart's headline is the verdict
    assert panel.locator("[data-testid=label-output-value] h2, .output-class").first \
        .inner_text().strip() == verdict
    # a threshold above every cosine: the verdict is "none of these", and the chart agrees
    set_number(panel, "'None of these' below cosine (0 = off)", 1)
    page.get_by_role("button", name="Classify", exact=True).click()
    wait_text(page, r"Verdict: none of these")
    assert panel.locator("[data-testid=label-output-value] h2, .output-class").first \
        .inner_text().strip() == "none of these"
    shot(page, "zero-shot")
    page.close()


def test_compare_flow(browser, served, tmp_path):
    """Compare (issue 18): two models side by side in one tab. Retrieval with the base model
    against a fine-tuned one (overlap@k, gained and lost), then Generate with two
    temperatures (the differing tokens marked)."""
    from appclient import tuned_clip

    url, ctx = served
    ctx.checkpoints["tuned-clip"] = str(tuned_clip(tmp_path / "tuned-clip", seed=3))
    page = open_app(browser, served)
    panel = tab(page, "Compare")
    panel.get_by_role("tab", name="Retrieval A/B", exact=True).click()
    sub = page.locator("[role=tabpanel]:visible").last
    model_b = sub.get_by_label("Model B")
    model_b.click()
    model_b.fill("tuned-clip")
    model_b.press("Enter")
    sub.get_by_role("button", name="Compare", exact=True).click()
    overlap = wait_text(page, r"overlap@5: \*?\*?(\d+)%")
    assert 0 <= int(overlap.group(1)) <= 100
    assert re.search(r"in both|gained by B|lost by B", sub.inner_text())
    panel.get_by_role("tab", name="Generate A/B", exact=True).click()
    sub = page.locator("[role=tabpanel]:visible").last
    set_number(sub, "Temperature B", 1.5)
    sub.get_by_role("button", name="Compare", exact=True).click()
    wait_text(page, r"A: \d+ tokens, B: \d+ tokens; (identical|first difference at token \d+)")
    shot(page, "compare")
    page.close()
