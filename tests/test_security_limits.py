"""Issue 11, holes 5-8 and 10 and the errors that escaped: nobody exhausts the server or
loses what they made. Each test replays the attack against the running app (tiny kit)."""

import io
import os
import random
import threading
import time
import zipfile
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

import mmcore
from appclient import launch, own_files, queue_call, wait_until


@pytest.fixture(scope="module")
def served(tiny_kit):
    demo, ctx, url = launch(["--kit", "tiny"])
    yield demo, ctx, url
    demo.close()


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), "blue").save(path)
    return path


# ------------------------------------------------------------------ 5. template amplification

def test_templates_are_plain_text_with_one_slot(served, photo):
    demo, ctx, url = served
    client = Client(url, verbose=False)
    try:
        for template in ["{{}}{:a>50000000}", "{} and {}", "{0} {1}", "{}{x}", "{:>9}", "{"]:
            job = client.submit(handle_file(str(photo)), "cat, dog", template, False, "softmax",
                                0, "base model", api_name="/zero_shot")
            with pytest.raises(Exception, match="[Tt]emplate") as err:
                job.result(timeout=20)
            assert "Internal error" not in str(err.value)
        # braces are fine as long as the one slot is {} (formatting is never str.format)
        chart, table, notes = client.predict(handle_file(str(photo)), "cat, dog",
                                             "a photo of {}.", False, "softmax", 0,
                                             "base model", api_name="/zero_shot")
        assert {row[0] for row in table["data"]} >= {"cat", "dog"}
    finally:
        client.close()


def test_the_label_cache_is_bounded_by_bytes(served, photo):
    demo, ctx, url = served
    cache = ctx.kit.encoder()._text_cache
    cache.max_bytes = 300_000
    client = Client(url, verbose=False)
    try:
        for round_ in range(4):
            labels = ", ".join(f"label {round_} {i} " + "x" * 300 for i in range(300))
            client.predict(handle_file(str(photo)), labels, "a photo of {}.", False, "softmax",
                           0, "base model", api_name="/zero_shot")
            assert cache.nbytes <= cache.max_bytes
        assert len(cache) > 0
    finally:
        client.close()


# ------------------------------------------------------------------ 6. disk

def zip_of(path, entries: dict):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, blob in entries.items():
            zf.writestr(name, blob)
    return path


def png_bytes(colour="red", size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_request_files_are_removed_and_downloads_go_with_the_session(served, tmp_path, photo):
    demo, ctx, url = served
    temp = os.environ["GRADIO_TEMP_DIR"]
    assert demo.delete_cache, "Gradio's own cache (uploads, outputs) must be cleaned"
    warm = Client(url, verbose=False)                      # app-wide files made once
    warm.predict(None, True, api_name="/validate_training_data")
    warm.predict("base model", api_name="/load_demo_gallery")
    warm.close()
    time.sleep(1.0)
    before = own_files(temp)
    csv = tmp_path / "s.csv"
    csv.write_text("sentence\nthe [MASK] sat\n")
    gallery = zip_of(tmp_path / "g.zip", {f"inner-{c}.png": png_bytes(c) for c in
                                          ("red", "green", "black")})
    data_zip = zip_of(tmp_path / "d.zip", {
        "a.png": png_bytes("red"), "b.png": png_bytes("blue"),
        "captions.csv": b"image,caption\na.png,red\nb.png,blue\n"})
    client = Client(url, verbose=False)
    client.predict(handle_file(str(csv)), 3, api_name="/fill_mask_batch")
    client.predict([handle_file(str(photo))], "a, b", "a photo of {}.", False, "softmax",
                   api_name="/zero_shot_batch")
    client.predict([handle_file(str(gallery))], "base model", api_name="/add_images")
    for _ in range(3):
        client.predict(None, True, api_name="/validate_training_data")
    client.predict(handle_file(str(data_zip)), False, api_name="/validate_training_data")
    client.predict(api_name="/save_index")
    client.predict("csv", api_name="/export_embeddings")
    during = own_files(temp) - before
    assert not any("inner-" in f or f.endswith(("a.png", "captions.csv")) for f in during), during
    downloads = [f for f in during if not Path(f).name.startswith(".")]
    assert len(downloads) <= 4, during        # the four downloads: two CSVs, index, export
    client.close()                           # the user session ends
    assert wait_until(lambda: own_files(temp) <= before, timeout=20), own_files(temp) - before


def test_zip_bytes_count_against_a_session_quota_and_uploads_are_capped(served, tmp_path, photo):
    demo, ctx, url = served
    temp = os.environ["GRADIO_TEMP_DIR"]
    ctx.session_disk_bytes = 1_000_000
    rng = random.Random(0)
    big = zip_of(tmp_path / "big.zip", {f"p{i}.png": rng.randbytes(400_000) for i in range(5)})
    before = own_files(temp)
    client = Client(url, verbose=False)
    try:
        with pytest.raises(Exception, match="disk") as err:
            client.predict([handle_file(str(big))], "base model", api_name="/add_images")
        assert "Internal error" not in str(err.value)
        assert not any(f.endswith(".png") and "/p" in f for f in own_files(temp) - before)
        many = [handle_file(str(photo))] * 65
        with pytest.raises(Exception, match="at most"):
            client.predict(many, "a, b", "a photo of {}.", False, "softmax",
                           api_name="/zero_shot_batch")
    finally:
        client.close()
        ctx.session_disk_bytes = 512 * 2**20


def test_an_upload_request_is_capped_before_it_is_written(served):
    import socket
    from urllib.parse import urlparse

    import httpx

    demo, ctx, url = served
    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        sock.sendall(b"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"multipart/form-data; boundary=b\r\nContent-Length: 60000000000\r\n\r\n")
        assert b" 413 " in sock.recv(4096).split(b"\r\n")[0]

    def chunks():
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
        yield b"x" * 1000 + b"\r\n--b--\r\n"

    r = httpx.post(f"{url}gradio_api/upload", content=chunks(), timeout=30,
                   headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 411
    ok = httpx.post(f"{url}gradio_api/upload", files={"files": ("a.txt", b"hello")}, timeout=30)
    assert ok.status_code == 200


def test_uploads_together_are_capped(served):
    """Many upload requests, each under its own cap, cannot fill the disk: Gradio's upload
    folder as a whole stays within the server's temp-disk quota (507 past it)."""
    import httpx

    from mmcore.archives import size_of

    demo, ctx, url = served
    used = size_of(Path(os.environ["GRADIO_TEMP_DIR"]))
    ctx.files.total_bytes = used + 3 * 2**20
    try:
        sizes = []
        for i in range(4):                       # 1 MB each, distinct bytes
            r = httpx.post(f"{url}gradio_api/upload", timeout=30,
                           files={"files": (f"f{i}.bin", bytes([i]) * 2**20)})
            sizes.append(r.status_code)
        assert sizes[:2] == [200, 200] and sizes[-1] == 507, sizes
        assert "full" in r.text
        assert size_of(Path(os.environ["GRADIO_TEMP_DIR"])) <= used + 3 * 2**20
    finally:
        ctx.files.total_bytes = 8192 * 2**20
    assert httpx.post(f"{url}gradio_api/upload", files={"files": ("a.txt", b"hi")},
                      timeout=30).status_code == 200


def test_uploads_still_streaming_in_count_against_the_cap(tmp_path):
    """A slow upload's bytes are not on disk when the folder is measured: accepted uploads
    count at their declared size until they end, whatever the measurements say."""
    import asyncio

    from demos.files import UploadLimit

    async def scenario():
        release = asyncio.Event()

        async def slow_app(scope, receive, send):        # Gradio, writing a slow body
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        limit = UploadLimit(slow_app, max_bytes=600, total_bytes=lambda: 1000, root=tmp_path)
        limit.RECOUNT = 0                                 # measure before every request
        statuses = []

        async def upload(size):
            sent = []

            async def send(message):
                if message["type"] == "http.response.start":
                    sent.append(message["status"])

            scope = {"type": "http", "method": "POST", "path": "/gradio_api/upload",
                     "headers": [(b"content-length", str(size).encode())]}
            await limit(scope, None, send)
            statuses.append((size, sent[0]))

        first = asyncio.create_task(upload(500))
        second = asyncio.create_task(upload(450))
        await asyncio.sleep(0.05)
        await upload(500)                  # 500 + 450 still streaming: no room for 500
        release.set()
        await asyncio.gather(first, second)
        (tmp_path / "landed.bin").write_bytes(b"\0" * 950)      # what they wrote
        await upload(100)                  # measured: 950 on disk, nothing in flight
        return statuses

    # bounded: a middleware that lets the third upload through waits on `release` for ever
    statuses = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert statuses == [(500, 507), (500, 200), (450, 200), (100, 507)], statuses


def test_training_stops_taking_runs_when_the_data_dir_is_full(tiny_kit, tmp_path):
    """Fine-tuned models outlive restarts, so nothing removes them: past the data dir's
    quota (--data-disk-mb) a new run is refused with a clear message, and nothing saved
    is touched."""
    data_dir = tmp_path / "data"
    demo, ctx, url = launch(["--kit", "tiny", "--data-dir", str(data_dir),
                             "--data-disk-mb", "1"])
    client = Client(url, verbose=False)
    try:
        assert "finished" in client.predict(None, True, 1, 16, 1e-3, 0.05, 0.1, "projections",
                                            1, 0, "first", api_name="/train")[0]
        (data_dir / "operator-notes.bin").write_bytes(b"\0" * 2**20)      # now over 1 MB
        saved = sorted(p.name for p in (data_dir / "models").iterdir())
        with pytest.raises(Exception, match="storage for fine-tuned models is full"):
            client.predict(None, True, 1, 16, 1e-3, 0.05, 0.1, "projections", 1, 0, "second",
                           api_name="/train")
        assert sorted(p.name for p in (data_dir / "models").iterdir()) == saved
        assert "first" in client.predict(api_name="/kit_info")["finetuned"]
        # what fills it is a cut-short run's training data (scratch): that goes first
        (data_dir / "operator-notes.bin").unlink()
        cut = ctx.data.new_run({}, "cut")
        ctx.data.data(cut).mkdir()
        (ctx.data.data(cut) / "big.bin").write_bytes(b"\0" * 2**20)
        ctx.data.finish(cut, "stopped")
        assert "finished" in client.predict(None, True, 1, 16, 1e-3, 0.05, 0.1, "projections",
                                            1, 0, "second", api_name="/train")[0]
        assert not ctx.data.data(cut).exists() and "cut" not in ctx.data.resumable(None)
        assert sorted(p.name for p in (data_dir / "models").iterdir()) == saved + ["second"]
    finally:
        client.close()
        demo.close()


# ------------------------------------------------------------------ 7. cancel

@pytest.mark.parametrize("api", ["fill_mask_batch", "next_sentence_batch", "zero_shot_batch",
                                 "validate_training_data"])
def test_cancel_stops_batch_work(served, tmp_path, monkeypatch, api, photo):
    demo, ctx, url = served
    calls = {"n": 0}
    lock = threading.Lock()

    def slow(real):
        def wrapper(*args, **kwargs):
            with lock:
                calls["n"] += 1
            time.sleep(0.1)
            return real(*args, **kwargs)
        return wrapper

    from mmcore import train_data

    owner = train_data if api == "validate_training_data" else ctx.kit
    target = {"fill_mask_batch": "fill_mask_details", "next_sentence_batch": "next_sentence",
              "zero_shot_batch": "zero_shot_details", "validate_training_data": "load_image"}[api]
    monkeypatch.setattr(owner, target, slow(getattr(owner, target)))
    csv = tmp_path / "rows.csv"
    if api == "fill_mask_batch":
        csv.write_text("sentence\n" + "the [MASK] sat on the mat\n" * 150)
        args = (handle_file(str(csv)), 3)
    elif api == "next_sentence_batch":
        csv.write_text("first,second\n" + "the cat sat,then it slept\n" * 150)
        args = (handle_file(str(csv)),)
    elif api == "zero_shot_batch":
        args = ([handle_file(str(photo))] * 64, "a, b", "a photo of {}.", False,
                "softmax")
    else:
        args = (None, True)                    # the demo set: 72 images to check
    client = Client(url, verbose=False)
    try:
        job = client.submit(*args, api_name=f"/{api}")
        assert wait_until(lambda: calls["n"] >= 3, timeout=60)
        job.cancel()
        time.sleep(0.5)
        at_cancel = calls["n"]
        time.sleep(2.0)
        assert calls["n"] <= at_cancel + 1, (at_cancel, calls["n"])
        assert calls["n"] < 40
    finally:
        client.close()


# ------------------------------------------------------------------ 8. extra kits

def test_extra_kits_are_bounded_and_memory_is_shown(served, tmp_path, photo):
    import shutil

    from mmcore import kits, tiny

    demo, ctx, url = served
    ctx.max_extra_kits = 1
    names = []
    for i in range(3):
        folder = tmp_path / f"tuned-{i}"
        shutil.copytree(tiny.folder("clip"), folder)
        ctx.checkpoints[folder.name] = str(folder)
        names.append(folder.name)
    client = Client(url, verbose=False)
    try:
        for name in names:
            client.predict(handle_file(str(photo)), "cat, dog", "a photo of {}.", False,
                           "softmax", 0, name, api_name="/zero_shot")
        alive = [k for k in kits._kits.values()
                 if str(tmp_path) in k.spec("dual_encoder").source]
        loaded = [key for key in kits._registry if str(tmp_path) in str(key)]
        assert len(alive) <= 1 and len(loaded) <= 1, (alive, loaded)
        info = client.predict(api_name="/kit_info")
        assert info["memory"]["rss_mb"] > 0
        assert info["memory"]["extra_models"]["limit"] == 1
        assert len(info["memory"]["extra_models"]["loaded"]) == 1
    finally:
        client.close()
        for name in names:
            ctx.checkpoints.pop(name, None)


# ------------------------------------------------------------------ 10. restarts

class Died(BaseException):
    """What a killed process looks like to the training thread: it just stops."""


def test_finetuned_models_survive_a_restart_and_runs_resume(tiny_kit, tmp_path, monkeypatch):
    from demos import train as train_tab

    data_dir = tmp_path / "data"
    demo, ctx, url = launch(["--kit", "tiny", "--data-dir", str(data_dir)])
    try:
        client = Client(url, verbose=False)
        status = client.predict(None, True, 2, 16, 1e-3, 0.05, 0.1, "projections", 1, 0,
                                api_name="/train")[0]
        assert "finished" in status
        finished = client.predict(api_name="/kit_info")["finetuned"]
        assert len(finished) == 1
        real = mmcore.finetune

        def dies(*args, progress=None, **kwargs):
            def hook(row):
                progress(row)
                if row["step"] == 4:
                    raise Died()
            return real(*args, progress=hook, **kwargs)

        monkeypatch.setattr(train_tab.mmcore, "finetune", dies)
        status = client.predict(None, True, 3, 16, 1e-3, 0.05, 0.1, "projections", 1, 1,
                                api_name="/train")[0]
        client.close()
    finally:
        demo.close()
    monkeypatch.setattr(train_tab.mmcore, "finetune", real)
    stale = data_dir / "models" / ".tmp-finetuned-x-1234"
    stale.mkdir(parents=True)
    (stale / "half.safetensors").write_bytes(b"\0" * 100)
    demo, ctx, url = launch(["--kit", "tiny", "--data-dir", str(data_dir)])
    try:
        client = Client(url, verbose=False)
        info = client.predict(api_name="/kit_info")
        assert info["finetuned"] == finished                      # the finished model is back
        assert not stale.exists()                                 # half-written folders go
        assert len(info["resumable"]) == 1
        run = info["resumable"][0]
        status, _, _, compare, download = client.predict(run, api_name="/resume_training")
        assert "finished" in status
        info = client.predict(api_name="/kit_info")
        assert run in info["finetuned"] and not info["resumable"]
        chart, table, notes = client.predict(handle_file(str(_photo(tmp_path))), "cat, dog",
                                             "a photo of {}.", False, "softmax", 0, run,
                                             api_name="/zero_shot")
        assert table["data"]
        client.close()
    finally:
        demo.close()


def _photo(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (32, 32), "green").save(path)
    return path


# ------------------------------------------------------------------ errors that escaped

def bad_zip(path):
    """Entries named '.', '', 300 characters, 2,100 folders deep, a file that is also a
    folder, and one with damaged deflate data, beside one good image."""
    good = png_bytes("red")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good.png", good)
        for name in (".", "", "n" * 300 + ".png", "d/" * 2100 + "deep.png", "x.png",
                     "x.png/y.png"):
            zf.writestr(zipfile.ZipInfo(name) if name in (".", "") else name, good)
        zf.writestr("damaged.png", png_bytes("blue", (200, 200)) * 3)
    blob = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo("damaged.png")
    start = info.header_offset + 30 + len(info.filename) + 20
    blob[start:start + 40] = b"\xff" * 40
    path.write_bytes(bytes(blob))
    return path


def test_errors_become_clear_messages(served, tmp_path):
    demo, ctx, url = served
    messages = []

    def clear(result, match=None):
        text = result.error or ""
        messages.append(text + str(result.data))
        assert "internal error" not in text.lower(), result
        if match:
            assert match in (text + str(result.data)).lower(), result
        return result

    client = Client(url, verbose=False)
    try:
        archive = bad_zip(tmp_path / "bad.zip")
        status = client.predict([handle_file(str(archive))], "base model", api_name="/add_images")
        messages.append(status)
        assert "1 added" in status and "damaged.png" in status
        with pytest.raises(Exception, match="usable") as err:     # no captions in it
            client.predict(handle_file(str(archive)), False, api_name="/validate_training_data")
        messages.append(str(err.value))
        assert "Internal error" not in str(err.value)
        odd = tmp_path / "odd.csv"
        # UTF-16 by its BOM, with an odd number of bytes
        odd.write_bytes(b"\xff\xfe" + "sentence\nthe [MASK] sat\n".encode("utf-16-le") + b"x")
        path, summary = client.predict(handle_file(str(odd)), 3, api_name="/fill_mask_batch")
        formulas = tmp_path / "f.csv"
        formulas.write_text('sentence\n"  =1+1 [MASK]"\n"\n=2+2 [MASK]"\n＝3+3 [MASK]\n',
                            encoding="utf-8")
        path, summary = client.predict(handle_file(str(formulas)), 3,
                                       api_name="/fill_mask_batch")
        import csv

        with open(path, encoding="utf-8") as f:
            cells = [row["sentence"] for row in csv.DictReader(f)]
        assert len(cells) == 3 and all(c.startswith("'") for c in cells), cells
    finally:
        client.close()
    labels = list(mmcore.attention.choices(ctx.kit))
    clear(queue_call(url, "worked_example", ["the \ud800 cat"]), "invalid character")
    for fn in ("load_model", "model_status"):        # their status text had echoed the name
        clear(queue_call(url, fn, ["causal_lm", "ab\ud800cd"]), "invalid character")
    for template in ("{} and {}", "{0} {1}"):
        clear(queue_call(url, "zero_shot_batch", [[], "a, b", template, False, "softmax", 0,
                                                  "base model"]))
    for seed in ("inf", "1e400", "-inf", "nan"):
        clear(queue_call(url, "generate", ["the cat", 4, 0, 0, 1, 1, seed, "", "auto", "base model"]), "seed")
    nan = float("nan")
    clear(queue_call(url, "attention", ["the cat", labels[0], nan, 0]), "layer")
    clear(queue_call(url, "attention", ["the cat", labels[0], 1, nan]), "head")
    clear(queue_call(url, "fill_mask", ["the [MASK] sat", nan, "", "base model"]), "top")
    clear(queue_call(url, "train", [None, True, 1, 16, 1e-3, 0.05, 0.1, "projections", 1, nan,
                                    ""]), "seed")
    clear(queue_call(url, "search", [None, "a cat", None, "", nan]))
    temp = os.environ["GRADIO_TEMP_DIR"]
    for text in messages:
        assert temp not in text and str(Path(__file__).parent.parent) not in text, text
