"""Defects found in review (hostile use of today's features); each test fails on the code
it was written against."""

import json
import os
import shutil

import pytest

from mmcore import InputError, tiny
from mmcore.model_pool import ModelPool


# ---------------------------------------------------------------- model pool (security)

def test_open_loading_refuses_a_server_folder_named_like_a_hub_id(tiny_kit, tmp_path,
                                                                   monkeypatch):
    """--allow-model-loading is "any hub id, never a server folder unless listed"; but a name
    shaped like a hub id ("owner/name") that is a folder relative to the server's working
    directory loads that folder (hub.is_local checks Path(source).is_dir())."""
    shutil.copytree(tiny.folder("gpt2"), tmp_path / "private" / "model")
    monkeypatch.chdir(tmp_path)
    pool = ModelPool(tiny_kit, open_loading=True)
    try:
        pool.request("causal_lm", "private/model", wait=True)
    except InputError:
        return                                       # refused: the fix
    assert pool.status("causal_lm", "private/model") != "ready", \
        "a user loaded the server folder ./private/model by naming it as a hub id"


# ---------------------------------------------------------------- OpenAI API (crash)

@pytest.mark.parametrize("field, raw", [("max_tokens", "1e999"), ("n", "NaN"),
                                        ("top_k", "Infinity"), ("max_tokens", "NaN")])
def test_openai_api_non_finite_numbers_are_a_400_not_an_internal_error(field, raw):
    """Python's json accepts NaN/Infinity/1e999; `_number` casts with int() before checking,
    so int(inf) / int(nan) raise OverflowError / ValueError, which error_body turns into
    HTTP 500 "Internal error" (and a logged stack trace) instead of a 400 naming the field."""
    from demos.openai_api import error_body, sampling

    body = json.loads('{"%s": %s}' % (field, raw))
    try:
        sampling(body, 16)
    except Exception as exc:  # noqa: BLE001
        status, payload = error_body(exc)
        assert status == 400, payload
        assert field.split("_")[0] in payload["error"]["message"]
    else:
        pytest.fail("a non-finite number was accepted")


# ---------------------------------------------------------------- mmcore-train (crash)

def test_train_cli_negative_workers_is_a_bad_argument_not_a_traceback(tmp_path, capsys):
    """`mmcore-train DATA --out X --workers -1` is not checked: it reaches DataLoader, whose
    ValueError escapes main() as a traceback (exit 1 from the interpreter, not 2)."""
    from mmcore import demo_data, train

    data = demo_data.make(tmp_path / "data", photos=False)
    try:
        code = train.main([str(data), "--out", str(tmp_path / "ck"), "--kit", "tiny",
                           "--epochs", "1", "--workers", "-1"])
    except SystemExit as exc:                     # argparse refusing it is fine too
        code = exc.code
    assert code == 2
    assert "workers" in capsys.readouterr().err


# ---------------------------------------------------------------- request bodies (memory DoS)

def _bytes_read(app, path: str, total: int, chunk: int = 1 << 20) -> int:
    """Bytes an ASGI app reads of a chunked POST body of `total` bytes (no Content-Length)
    before it answers."""
    import asyncio

    sent = {"n": 0}
    piece = b"x" * chunk

    async def receive():
        if sent["n"] >= total:
            return {"type": "http.disconnect"}
        sent["n"] += chunk
        return {"type": "http.request", "body": piece, "more_body": sent["n"] < total}

    async def send(message):
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 1), "headers": [(b"transfer-encoding", b"chunked"),
                                                     (b"content-type", b"application/json")]}
    asyncio.run(app(scope, receive, send))
    return sent["n"]


def test_index_server_stops_reading_a_body_past_its_limit(tiny_kit):
    """POST /search checks the size only after `await request.body()` has buffered all of
    it: a chunked body (no Content-Length) of any size is held in memory first."""
    import torch
    from mmcore import index_server
    from mmcore.index import Index

    index = Index(tiny_kit.encoder())
    index.vectors = torch.nn.functional.normalize(torch.ones(1, 16), dim=1)
    index.ids, index.captions, index.hashes, index.thumbnails = ["a"], [""], ["h"], [b""]
    read = _bytes_read(index_server.make_app(index), "/search", 2 * index_server.MAX_BODY)
    assert read <= index_server.MAX_BODY + (1 << 20), f"read {read:,} bytes"


def test_openai_api_stops_reading_a_body_past_its_limit():
    """The /v1 routes read the whole body, then compare it with MAX_BODY (256 KiB): a client
    can make the server hold any amount in memory (no Content-Length check, no cap while
    reading)."""
    from types import SimpleNamespace

    from fastapi import FastAPI

    from demos import openai_api

    app = FastAPI()
    openai_api.mount(app, SimpleNamespace(queue_size=4))
    read = _bytes_read(app, "/v1/completions", 64 * openai_api.MAX_BODY, chunk=64 * 1024)
    assert read <= openai_api.MAX_BODY + 64 * 1024, f"read {read:,} bytes"


# ---------------------------------------------------------------- model pool (server paths)

def test_models_listing_never_shows_a_listed_folders_server_path(tiny_kit, tmp_path):
    """/models names a listed folder by public_name (no server path), but the status of a
    failed load is the loader's raw message: "error: Cannot read a model config from
    '/srv/.../broken': ..." goes to every user, unscrubbed."""
    from demos.context import AppContext
    from demos.model_loading import catalogue

    broken = tmp_path / "operator-models" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    ctx = AppContext(kit=tiny_kit, data_dir=str(tmp_path / "data"),
                     allowed_models={"causal_lm": [str(broken)]})
    ctx.pool.request("causal_lm", str(broken), wait=True)
    rows = [r for r in catalogue(ctx) if r["kind"] == "run-time"]
    assert rows and rows[0]["status"].startswith("error")
    assert str(tmp_path) not in json.dumps(rows), rows


# ---------------------------------------------------------------- compare / index (wrong answer)

def test_a_clip_folders_identity_changes_with_its_weights(tmp_path):
    """Compare > Retrieval caches the demo index per `encoder.identity`, and saved indexes
    are checked against it; a CLIP folder's identity is its path only, so a model retrained
    into the same folder (the Train tab's resume/overwrite) is served the index embedded
    by the old weights: rankings from two different models, silently."""
    import shutil

    import torch

    from appclient import tuned_clip
    from mmcore.dual_encoder import load_encoder

    folder = tmp_path / "my-clip"
    old = load_encoder(tuned_clip(folder, seed=1))
    shutil.rmtree(folder)
    new = load_encoder(tuned_clip(folder, seed=2))
    t = ["a cat"]
    assert not torch.allclose(old.encode_texts(t), new.encode_texts(t))   # other weights
    assert old.identity != new.identity


# ---------------------------------------------------------------- Models tab (polish)

def test_a_users_own_hub_id_shows_its_failure_to_that_user(tiny_kit, tmp_path):
    """With --allow-model-loading, /load_model answers at once; the user who asked learns
    the outcome (an error says why) from /model_status, while /models lists only loaded or
    operator-listed models (one user's typed ids are not shown to everyone)."""
    from demos.context import AppContext
    from demos.model_loading import catalogue

    ctx = AppContext(kit=tiny_kit, data_dir=str(tmp_path / "data"), allow_model_loading=True)
    ctx.pool.request("causal_lm", "no-such-owner/no-such-model", wait=True)
    status = ctx.pool.status("causal_lm", "no-such-owner/no-such-model")
    assert status.startswith("error") and "could not be fetched" in status
    assert not [r for r in catalogue(ctx) if r["model"] == "no-such-owner/no-such-model"]


# ---------------------------------------------------------------- model pool (resources)

def test_open_loading_bounds_the_loads_one_user_can_queue(tiny_kit):
    """Each /load_model of a new hub id starts a thread at once, with no cap: loads run one
    at a time (kits._load_serial), so a client naming 200 ids parks 200 threads, each of
    which will download and load a model; nothing says "busy, try later"."""
    import threading
    import time

    from mmcore import kits

    pool = ModelPool(tiny_kit, open_loading=True)
    refused = 0
    with kits._load_serial:                       # a slow load in progress
        for i in range(40):
            try:
                pool.request("causal_lm", f"someone/model-{i}")
            except InputError:
                refused += 1
        time.sleep(0.5)
        waiting = sum(t.name.startswith("mmcore-load") for t in threading.enumerate())
    assert refused > 0 and waiting <= 8, f"{waiting} loads queued, {refused} refused"


# ---------------------------------------------------------------- mmcore-index build (data loss)

@pytest.mark.parametrize("where", ["same", "parent"])
def test_index_build_never_replaces_the_folder_it_indexes(tiny_kit, tmp_path, where):
    """`mmcore-index build photos --out photos --overwrite` (or --out a parent of photos)
    indexes the photos, then replaces the folder with the index: every photo (and any other
    file there) is deleted, exit status 0."""
    from PIL import Image

    from mmcore.index_cli import build_folder

    photos = tmp_path / "album" / "photos"
    photos.mkdir(parents=True)
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (32, 32), colour).save(photos / f"{i}.png")
    out = photos if where == "same" else photos.parent
    try:
        build_folder(tiny_kit, photos, out, overwrite=True)
    except InputError:
        pass                                          # refused: the fix
    assert sorted(p.name for p in photos.glob("*.png")) == ["0.png", "1.png"]


# ---------------------------------------------------------------- OpenAI API (compatibility)

@pytest.mark.parametrize("field, value", [("best_of", 1), ("logit_bias", {}), ("tools", []),
                                          ("echo", False)])
def test_openai_api_accepts_refused_fields_at_their_do_nothing_value(field, value):
    """Fields the server cannot honour are refused unless None/False/0, but best_of=1 (its
    default), logit_bias={} and tools=[] also mean "nothing" and clients send them (e.g.
    LangChain's OpenAI LLM sends best_of=1): such requests get a 400."""
    from demos.openai_api import sampling

    params, n = sampling({field: value, "max_tokens": 4}, 16)
    assert n == 1 and params.max_new_tokens == 4


# ---------------------------------------------------------------- sharded build (wrong answer)

def test_a_sharded_build_drops_duplicates_as_a_one_process_build_does(tmp_path):
    """The module promises a torchrun build "equals a one-process build"; one process skips
    a second file with the same pixels, but shards de-duplicate only within themselves and
    the merge keeps both copies when they fall to different ranks."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 32), "red").save(photos / "a.png")
    Image.new("RGB", (32, 32), "red").save(photos / "b.png")          # same pixels
    Image.new("RGB", (32, 32), "blue").save(photos / "c.png")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    counts = []
    for launcher in ([], ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29531"]):
        out = tmp_path / f"index{len(launcher)}"
        cmd = [sys.executable, *launcher, "-m", "mmcore.index", "build", str(photos),
               "--out", str(out), "--kit", "tiny", "--quiet"]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        counts.append(len(json.loads((out / "meta.json").read_text())["ids"]))
    assert counts[0] == 2 and counts[1] == counts[0], counts


# ---------------------------------------------------------------- compare.retrieval (wrong answer)

def test_overlap_of_two_identical_rankings_is_complete_when_fewer_than_k():
    """compare.retrieval divides by k even when both lists hold fewer than k results (a
    gallery smaller than k): two identical rankings report overlap 40%."""
    from mmcore import compare

    assert compare.retrieval(["a", "b"], ["a", "b"], k=5).overlap == 1.0


# ---------------------------------------------------------------- model pool (memory budget)

def _gpt2_copy(folder, scale):
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny.folder("gpt2"), folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    model.save_pretrained(folder)
    return str(folder)


def test_an_evicted_model_in_use_is_not_reloaded_outside_the_budget(tiny_kit, tmp_path):
    """A request takes pool.kit(A); another user's load of B evicts A (release drops A's
    models from the registry); the first request's next kit.model() call silently loads A
    again into the registry, where no pool entry accounts for it or ever releases it: the
    --extra-model-mb budget is exceeded and the memory is never given back."""
    from mmcore import kits

    a, b = _gpt2_copy(tmp_path / "a", 1.5), _gpt2_copy(tmp_path / "b", 0.5)
    pool = ModelPool(tiny_kit, allowed={"causal_lm": [a, b]}, budget_mb=0.001)
    pool.request("causal_lm", a, wait=True)
    in_use = pool.kit("causal_lm", a)                 # a request holds A's kit
    pool.request("causal_lm", b, wait=True)           # evicts A
    assert pool.status("causal_lm", a) != "ready"
    in_use.generate("the cat", max_new_tokens=2)      # the request goes on
    leaked = [k for k in kits._registry if k[1] == a]
    assert not leaked, "A is loaded again, outside the pool and its budget"


# ---------------------------------------------------------------- mmcore-train (polish)

def test_train_cli_data_report_starts_its_own_line(tmp_path, capsys):
    """The progress bar is drawn before the data report, so the report's summary is glued to
    it: "training: 0step [00:00, ?step/s]64 usable image-caption pairs." (the lines a user
    reads first, and greps, are mangled)."""
    import re

    from mmcore import demo_data, train

    data = demo_data.make(tmp_path / "data", photos=False)
    (data / "junk.png").write_bytes(b"not a png")
    code = train.main([str(data), "--out", str(tmp_path / "ck"), "--kit", "tiny",
                       "--epochs", "1", "--workers", "0", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert re.search(r"^skipped junk\.png: ", err, re.M), err
    assert re.search(r"^\d+ usable image-caption pairs", err, re.M), err


# ---------------------------------------------------------------- mmcore-index CLI (crash)

@pytest.fixture()
def small_index(tiny_kit, tmp_path):
    from PIL import Image

    from mmcore.index_cli import build_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (32, 32), colour).save(photos / f"{i}.png")
    build_folder(tiny_kit, photos, tmp_path / "index")
    return str(tmp_path / "index")


def test_index_search_takes_queries_after_options(small_index, capsys):
    """`queries` is nargs="*" after the index: argparse fills it (empty) right after DIR, so
    `mmcore-index search DIR -k 2 "a cat"` (or `--kit tiny "a cat"`) exits 2 with
    "unrecognized arguments: a cat"."""
    from mmcore import index_cli

    try:
        code = index_cli.main(["search", small_index, "-k", "2", "--kit", "tiny", "a red"])
    except SystemExit as exc:
        code = exc.code
    assert code == 0, capsys.readouterr().err
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_index_serve_bad_port_is_a_message_not_a_traceback(small_index, capsys):
    """`mmcore-index serve DIR --port 99999` raises OverflowError out of main() (uvicorn's
    bind) with two tracebacks, instead of exit 2 and a line naming the port."""
    from mmcore import index_cli

    try:
        code = index_cli.main(["serve", small_index, "--kit", "tiny", "--port", "99999"])
    except SystemExit as exc:
        code = exc.code
    except OverflowError:
        code = "OverflowError raised"
    assert code == 2
    assert "port" in capsys.readouterr().err


def test_index_server_results_do_not_name_server_paths(small_index, tiny_kit, tmp_path):
    """`mmcore-index build /srv/photos` keeps each file's full path as its id, and POST
    /search returns it to every client ("id": "/srv/photos/0.png"): the server's folder
    layout (user names, mount points) goes out with each answer; ids relative to the
    indexed folder would name the same photo without it (and keep the index portable)."""
    from fastapi.testclient import TestClient

    from mmcore import index_server
    from mmcore.index import Index

    client = TestClient(index_server.make_app(Index.load(small_index, tiny_kit)))
    answer = client.post("/search", json={"text": "a red square", "k": 3}).json()
    assert len(answer["results"]) == 3
    assert str(tmp_path) not in json.dumps(answer), answer["results"][0]["id"]
