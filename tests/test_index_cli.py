"""The index's command line and HTTP back end as programs use them: help and choices, the data
report on stderr, exit statuses, several queries (and stdin) per model load, JSON output, and
`serve` answering searches over HTTP with the same numbers as `Index.results`."""

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from skimage import data

from mmcore import Index
from mmcore import index_server

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = {"chelsea": "a cat sitting on a red sofa", "coffee": "a cup of coffee on a saucer",
          "rocket": "a rocket on its launch pad"}


def cli(*args, stdin=None, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mmcore.index", *map(str, args)], env=env,
                          input=stdin, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gallery")
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    Image.fromarray(data.chelsea()).save(folder / "chelsea-again.png")      # same pixels
    (folder / "broken.jpg").write_bytes(b"not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def built(gallery, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "index"
    run = cli("build", gallery, "--out", out, "--kit", "tiny")
    return out, run


def test_build_reports_skipped_files_on_stderr(built):
    out, run = built
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"indexed {len(PHOTOS)} images into {out}"
    assert "skipped" in run.stderr and "broken.jpg" in run.stderr
    assert "not an image" in run.stderr                    # the reason, not just the name
    assert "1 duplicate" in run.stderr
    assert "Traceback" not in run.stderr


def test_nothing_usable_exits_1_and_saves_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"\x89PNG broken")
    run = cli("build", tmp_path / "in", "--out", tmp_path / "out", "--kit", "tiny", "--quiet")
    assert run.returncode == 1
    assert "no usable image" in run.stderr and "a.png" in run.stderr
    assert not (tmp_path / "out").exists() and run.stdout == ""


@pytest.mark.parametrize("args, code, message", [
    (["search", "IDX", "cat", "--kit", "nope"], 2, "invalid choice: 'nope'"),
    (["search", "MISSING", "cat", "--kit", "tiny"], 2, "not a complete mmcore index"),
    (["search", "IDX", "--kit", "tiny"], 2, "Give a query"),
    (["search", "IDX", "--image", "no-such.png", "--kit", "tiny"], 2, "no-such.png: no such file"),
    (["build", "NOT-A-FOLDER", "--out", "X", "--kit", "tiny"], 2, "no such folder"),
])
def test_bad_arguments_get_a_message_on_stderr_and_no_traceback(built, tmp_path, args, code,
                                                                message):
    out, _ = built
    args = [str(out) if a == "IDX" else str(tmp_path / a) if a in ("MISSING", "X") else a
            for a in args]
    run = cli(*args)
    assert run.returncode == code
    assert message in run.stderr and "Traceback" not in run.stderr
    assert run.stdout == ""


def test_help_names_defaults_and_choices():
    run = cli("search", "--help")
    assert run.returncode == 0
    assert "{offline,hub,tiny}" in run.stdout and "(default: 5)" in run.stdout
    assert "stdin" in run.stdout


def test_a_kit_that_cannot_load_exits_1_with_the_reason(built):
    out, _ = built
    run = cli("search", out, "cat", "--kit", "hub", env={"HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1
    assert run.stderr.startswith("error:") and "Traceback" not in run.stderr


def test_many_queries_one_load_json_equals_the_library(built, tiny_kit):
    out, _ = built
    run = cli("search", out, "a cat", "-", "--image", Path(out).parent.parent / "x.png",
              "--kit", "tiny", "--json", "-k", "2", stdin="a rocket\n\nsome coffee\n")
    assert run.returncode == 2                              # the image does not exist
    run = cli("search", out, "a cat", "-", "--kit", "tiny", "--json", "-k", "2",
              stdin="a rocket\n\nsome coffee\n")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["query"] for line in lines] == ["a cat", "a rocket", "some coffee"]
    index = Index.load(out, tiny_kit)
    for line in lines:
        want = index.results(text=line["query"], k=2)
        assert [r["id"] for r in line["results"]] == [w["id"] for w in want]
        assert [r["score"] for r in line["results"]] == pytest.approx(
            [w["score"] for w in want], abs=1e-5)
    plain = cli("search", out, "a cat", "a rocket", "--kit", "tiny", "-k", "1")
    assert plain.stdout.splitlines()[0] == "# a cat" and len(plain.stdout.splitlines()) == 4


@pytest.fixture(scope="module")
def http(built, tiny_kit):
    from fastapi.testclient import TestClient

    index = Index.load(built[0], tiny_kit)
    return index, TestClient(index_server.make_app(index))


def jpeg64(array) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_serve_answers_with_the_library_numbers(http):
    index, client = http
    assert client.get("/").json() == {"images": len(PHOTOS), "dim": index.vectors.shape[-1],
                                      "model": index.identity}
    got = client.post("/search", json={"text": "a cat", "k": 2, "negative": "a rocket"}).json()
    want = index.results(text="a cat", k=2, negative="a rocket")
    assert [r["id"] for r in got["results"]] == [w["id"] for w in want]
    assert [r["score"] for r in got["results"]] == pytest.approx([w["score"] for w in want])
    by_image = client.post("/search", json={"image": jpeg64(data.rocket()), "k": 1}).json()
    hit = by_image["results"][0]
    assert hit["id"].endswith("rocket.png") and hit["score"] > 0.99
    thumb = client.get(hit["thumbnail"])
    assert thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).format == "JPEG"


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"k": 3}).encode(), 400, "Give text or image"),
    (json.dumps({"image": "/etc/passwd"}).encode(), 400, "not valid base64"),
    (json.dumps({"text": "cat", "k": 0}).encode(), 400, "k must be a whole number"),
    (json.dumps({"text": "cat", "k": 2.5}).encode(), 400, "k must be a whole number"),
    (json.dumps({"text": ["cat"]}).encode(), 400, "text must be a string"),
    (json.dumps({"text": "cat", "path": "/etc"}).encode(), 400, "Unknown field"),
    (json.dumps({"image": base64.b64encode(b"<html>").decode()}).encode(), 400,
     "not an image"),
    (b"x" * (index_server.MAX_BODY + 1), 413, "over"),
])
def test_serve_refuses_bad_requests_with_plain_messages(http, body, status, message):
    _, client = http
    reply = client.post("/search", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == status and message in reply.json()["error"]


def test_serve_never_hands_back_stored_bytes_as_they_came(http):
    index, client = http
    index.thumbnails[0] = b"<script>alert(1)</script>"          # an edited saved index
    assert client.get("/thumbnail/0").status_code == 404
    assert client.get("/thumbnail/999").status_code == 404
    reply = client.get("/thumbnail/1")
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.content != index.thumbnails[1]                 # re-encoded by us


def test_serve_command_answers_over_http(built):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmcore.index", "serve", str(built[0]),
                             "--port", str(port), "--kit", "tiny"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/", timeout=5).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "serve did not start"
                time.sleep(0.5)
        assert info["images"] == len(PHOTOS)
        reply = httpx.post(f"http://127.0.0.1:{port}/search", json={"text": "a cup", "k": 3},
                           timeout=30).json()
        assert len(reply["results"]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
