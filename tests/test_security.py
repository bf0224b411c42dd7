"""Issue 11, holes 1-4: nobody reads, lists or stops what is not theirs. Each test replays
the attack against the running app (tiny kit) through gradio_client and raw HTTP."""

import io
import json
import secrets
import re
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from skimage import data

from appclient import file_data, fn_index, launch, queue_call

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def served(tiny_kit):
    demo, ctx, url = launch(["--kit", "tiny"])       # MMCORE_DATA_DIR: this session's own
    yield demo, ctx, url
    demo.close()


def without_files(data):
    """A response without its file payloads (their paths are the download links)."""
    if isinstance(data, dict):
        return None if "meta" in data else {k: without_files(v) for k, v in data.items()}
    if isinstance(data, list):
        return [without_files(v) for v in data]
    return data


def score_of(item) -> float:
    return float(item[1].split(" ")[0])


# ------------------------------------------------------------------ 1. crafted saved index

def test_a_crafted_index_never_serves_server_files(served, tmp_path):
    demo, ctx, url = served
    secret = secrets.token_hex(16)
    canary = Path(tempfile.gettempdir()) / f"canary-{secret}.txt"
    canary.write_text(f"canary {secret}")
    canary_png = Path(tempfile.gettempdir()) / f"canary-{secret}.png"
    Image.fromarray(data.rocket()).save(canary_png)
    svg = Path(tempfile.gettempdir()) / f"canary-{secret}.svg"
    svg.write_text(f"<svg xmlns='http://www.w3.org/2000/svg'><text>{secret}</text></svg>")
    client = Client(url, verbose=False)
    try:
        client.predict("base model", api_name="/load_demo_gallery")
        saved = Path(client.predict(api_name="/save_index"))
        with zipfile.ZipFile(saved) as zf:
            files = {n: zf.read(n) for n in zf.namelist()}
        meta = json.loads(files["meta.json"])
        # the saved file names no server path
        assert not any("/" in i or "\\" in i for i in meta["ids"]), meta["ids"]
        assert str(Path(tempfile.gettempdir())) not in files["meta.json"].decode()
        bait = [str(canary), str(ROOT / "app.py"), str(svg), str(canary_png)]
        meta["ids"][:4] = bait
        meta["captions"][:4] = ["<img src=x onerror=alert(1)>"] * 4
        files["meta.json"] = json.dumps(meta).encode()
        crafted = tmp_path / "crafted.zip"
        with zipfile.ZipFile(crafted, "w") as zf:
            for name, blob in files.items():
                zf.writestr(name, blob)
        client.predict(handle_file(str(crafted)), "base model", api_name="/load_index")
        hits, _ = client.predict("a cat", None, "", 10, api_name="/search")
        assert len(hits) == 10
        forbidden = [canary.read_bytes(), (ROOT / "app.py").read_bytes(), svg.read_bytes(),
                     canary_png.read_bytes()]
        for item in hits:
            got = Path(item["image"]).read_bytes()
            assert got not in forbidden and secret.encode() not in got
            Image.open(io.BytesIO(got)).verify()       # a thumbnail we encoded, or a tile
        captions = " ".join(item["caption"] for item in hits)
        assert "<img src=x onerror=alert(1)>" in captions     # shown as text, as given
    finally:
        client.close()
        for p in (canary, canary_png, svg):
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------ 2. file inputs

def test_file_inputs_take_only_uploaded_files(served, tmp_path):
    demo, ctx, url = served
    import os

    uploads = Path(os.environ["GRADIO_TEMP_DIR"])
    sentinel = tmp_path / f"sentinel-{secrets.token_hex(6)}.png"
    Image.new("RGB", (8, 8), "red").save(sentinel)
    client = Client(url, verbose=False)
    client.predict(handle_file(str(sentinel)), "a, b", "a photo of {}.", False, "softmax", 0,
                   "base model", api_name="/zero_shot")   # now it lies in the upload folder
    folder_of_upload = next(p.parent for p in uploads.rglob(sentinel.name))
    client.close()
    app_file = uploads / "not-an-upload" / "made-by-the-app.png"   # e.g. another's output
    app_file.parent.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), "blue").save(app_file)
    inside = [uploads, folder_of_upload, app_file]          # in Gradio's folder, not uploads
    outside = [ROOT, ROOT / "app.py", Path("/etc/passwd"), Path(tempfile.gettempdir())]
    calls = {
        "validate_training_data": lambda f: [f, False],
        "zero_shot": lambda f: [f, "a, b", "a photo of {}.", False, "softmax", 0, "base model"],
        "zero_shot_batch": lambda f: [[f], "a, b", "a photo of {}.", False, "softmax", 0,
                                      "base model"],
        "add_images": lambda f: [None, [f], "base model"],
        "search": lambda f: [None, "", f, "", 3],
        "load_index": lambda f: [None, f, "base model"],
        "fill_mask_batch": lambda f: [f, 3],
        "next_sentence_batch": lambda f: [f],
        "train": lambda f: [f, False, 1, 16, 1e-3, 0.05, 0.1, "projections", 1, 0, ""],
    }
    for api, make in calls.items():
        for target in inside + outside:
            result = queue_call(url, api, make(file_data(target)))
            text = result.error + json.dumps(without_files(result.data))
            assert "internal error" not in text.lower(), (api, target, result)
            assert sentinel.name not in text and str(uploads) not in text, (api, target)
            if target in inside:          # ours to refuse, with a message that says why
                assert "upload" in text.lower(), (api, target, result)
            else:                         # Gradio refuses these before the handler runs
                assert not result.success or "upload" in text.lower(), (api, target, result)
    # a raw value that is not a file payload at all is refused the same way
    result = queue_call(url, "zero_shot", [{"path": ["x"], "meta": {"_type": "gradio.FileData"}},
                                           "a", "a photo of {}.", False, "softmax", 0,
                                           "base model"])
    assert not result.success and "internal error" not in result.error.lower()
    # naming folders must not break the server's cleanup of Gradio's cache
    from gradio import route_utils

    route_utils.delete_files_created_by_app(demo, age=10**9)


# ------------------------------------------------------------------ 3. text is text

def test_a_text_query_is_never_read_as_a_path(served, tmp_path):
    demo, ctx, url = served
    probe = Path(tempfile.gettempdir()) / f"probe-{secrets.token_hex(6)}.png"
    Image.fromarray(data.chelsea()).save(probe)             # the demo gallery holds this photo
    session = secrets.token_hex(8)
    try:
        assert queue_call(url, "load_demo_gallery", [None, "base model"], session).success
        by_text = queue_call(url, "search", [None, str(probe), None, "", 3], session)
        assert by_text.success
        top = by_text.data[0][0]
        assert score_of((None, top["caption"])) < 0.99     # an image query would score ~1.0
        # clicking a result searches by that result's stored vector, whatever the event says
        shown = queue_call(url, "search", [None, "a rocket", None, "", 5], session).data[0]
        clicked = 3
        value = {"caption": "x"}               # whatever the event claims is not used
        again = queue_call(url, "search_by_result", [None, 5], session,
                           event_data={"index": clicked, "value": value})
        assert again.success, again
        first = again.data[0][0]
        assert first["caption"].split(" · ", 1)[1] == shown[clicked]["caption"].split(" · ", 1)[1]
        assert score_of((None, first["caption"])) > 0.999
    finally:
        probe.unlink(missing_ok=True)


# ------------------------------------------------------------------ 4. stopping a job

def test_no_event_skips_the_queue(served):
    demo, ctx, url = served
    deps = httpx.get(f"{url}config", timeout=30).json()["dependencies"]
    assert deps
    for dep in deps:
        r = httpx.post(f"{url}gradio_api/run/predict",
                       json={"data": [], "fn_index": dep["id"], "session_hash": "stranger"},
                       timeout=30)
        assert r.status_code >= 400, (dep.get("api_name"), r.text[:200])


def test_only_the_owner_stops_a_training_job(served):
    demo, ctx, url = served
    owner = Client(url, verbose=False)
    stranger = Client(url, verbose=False)
    job = owner.submit(None, True, 500, 16, 1e-3, 0.05, 0.1, "projections", 1, 0,
                       api_name="/train")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                "step" in str(o[0]) for o in job.outputs()):
            time.sleep(0.2)
        assert any("step" in str(o[0]) for o in job.outputs()), job.outputs()
        # an anonymous direct call and another session through the queue
        httpx.post(f"{url}gradio_api/run/predict",
                   json={"data": [""], "fn_index": fn_index(url, "stop_training"),
                         "session_hash": "stranger"}, timeout=30)
        with pytest.raises(Exception, match="started"):
            stranger.predict(api_name="/stop_training")
        seen = len(job.outputs())
        time.sleep(3)
        latest = str(job.outputs()[-1][0])
        assert "Training" in latest and not job.done(), latest     # still running
        assert len(job.outputs()) > seen
        # the status is visible to others, read-only
        assert "Training" in stranger.predict(api_name="/training_status")
        owner.predict(api_name="/stop_training")
        status = job.result(timeout=120)[0]
        assert "stopped" in status
    finally:
        owner.close()
        stranger.close()


def test_only_the_owner_resumes_a_run_it_stopped(served):
    """A stranger can neither see nor resume a run another session stopped (it would take
    the job over, so its owner could no longer stop it, and overwrite the owner's model)."""
    demo, ctx, url = served
    owner = Client(url, verbose=False)
    stranger = Client(url, verbose=False)
    try:
        job = owner.submit(None, True, 500, 16, 1e-3, 0.05, 0.1, "projections", 1, 0,
                           "owned-run", api_name="/train")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                "step" in str(o[0]) for o in job.outputs()):
            time.sleep(0.2)
        owner.predict(api_name="/stop_training")
        status = job.result(timeout=120)[0]
        assert "stopped" in status
        key = re.search(r"Resume key of this run: `([^`]+)`", status).group(1)
        name = "owned-run"
        assert name not in stranger.predict(api_name="/kit_info")["resumable"]
        assert name in owner.predict(api_name="/kit_info")["resumable"]
        for wrong in ("", "guess", key[:-1]):
            with pytest.raises(Exception, match="another session"):
                stranger.predict(name, wrong, api_name="/resume_training")
        assert not ctx.training.running
        again = owner.submit(name, "", api_name="/resume_training")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not ctx.training.running:
            time.sleep(0.1)
        with pytest.raises(Exception, match="started"):
            stranger.predict(api_name="/stop_training")
        owner.predict(api_name="/stop_training")
        status = again.result(timeout=120)[0]
        assert "stopped" in status
        # the owner's page reloaded (a new session): its resume key still opens the run
        key = re.search(r"Resume key of this run: `([^`]+)`", status).group(1)
        reloaded = Client(url, verbose=False)
        try:
            third = reloaded.submit(name, key, api_name="/resume_training")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not ctx.training.running:
                time.sleep(0.1)
            assert ctx.training.running
            reloaded.predict(api_name="/stop_training")          # its job now
            assert "stopped" in third.result(timeout=120)[0]
        finally:
            reloaded.close()
    finally:
        owner.close()
        stranger.close()


def test_messages_never_show_server_paths():
    import gradio as gr

    import mmcore
    from demos import context
    from mmcore import cache

    folder = cache.cache_root() / "models" / "tuned-x"

    @context.guarded
    def load():
        raise mmcore.ModelUnavailable(f"No such model folder: {folder}")

    with pytest.raises(gr.Error) as err:
        load()
    assert "tuned-x" in err.value.message and str(cache.cache_root()) not in err.value.message
