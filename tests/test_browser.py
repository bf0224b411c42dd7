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
    """Open a tab; returns its panel."""
    page.get_by_role("tab", name=title, exact=True).click()
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
    page.wait_for_function("(p) => new RegExp(p).test(document.body.innerText)",
                           arg=pattern, timeout=timeout)
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
        tab(page, t.TITLE)
    assert not page.errors, page.errors
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
    shot(page, "fine-tune")
    page.close()
