"""A real browser (Debian's headless Chromium) opens the served app and every tab renders.

Skips, saying why, where Chromium or Playwright is absent; `.ci/run` installs Chromium so CI
always runs it. The screenshot lands in artifacts/ (and is the README's picture).
"""

import os
import shutil
from pathlib import Path

import pytest

import app as app_module
from demos import TABS, launch_kwargs

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("MMCORE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# The closed network refuses Chromium's background connections; these flags stop it trying.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_every_tab_renders_in_chromium(browser, tiny_kit):
    demo, ctx = app_module.create(app_module.parse_args(["--kit", "tiny"]))
    ctx.start_warming()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True,
                            **launch_kwargs(ctx, "127.0.0.1", None, False))
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_text("kit tiny").first.wait_for(timeout=30_000)
        for tab in TABS:
            page.get_by_role("tab", name=tab.TITLE).click()
            page.get_by_role("tabpanel").filter(has=page.locator(":visible")).first.wait_for()
        # retrieval: load the demo gallery, search, then click a result to search by it
        page.get_by_role("tab", name="Retrieval").click()
        page.get_by_role("button", name="Load the demo photos").click()
        page.get_by_text("10 images in the gallery").wait_for(timeout=60_000)
        page.get_by_label("Text query").fill("a cat")
        page.get_by_role("button", name="Search", exact=True).click()
        thumbs = page.locator("button.thumbnail-item")
        thumbs.first.wait_for(timeout=30_000)
        assert thumbs.count() == 8
        assert not page.get_by_text("1.000 ·").count()       # no text query scores 1.0
        thumbs.nth(3).click()
        # searching by that image puts the image itself first, with cosine 1.000
        page.get_by_text("1.000 ·").first.wait_for(timeout=30_000)
        # the Models tab lists every role once the background warm-up finishes
        page.get_by_role("tab", name="Models").click()
        page.get_by_text("tiny random CLIP").first.wait_for(timeout=30_000)
        page.wait_for_function("() => document.body.innerText.split('ready').length > 4",
                               timeout=30_000)
        out = ROOT / "artifacts"
        out.mkdir(exist_ok=True)
        page.screenshot(path=str(out / "app-tiny.png"), full_page=True)
        assert (out / "app-tiny.png").stat().st_size > 10_000
        assert not errors, errors
    finally:
        demo.close()
