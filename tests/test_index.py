"""The retrieval index: build, incremental add, remove, search (text, image, vector, negative),
save/load safety, export, recall, the CLI and a 2-process build."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import mmcore
from mmcore import Index, InputError, cache
from mmcore import index as index_mod


def free_port() -> int:
    """A port nobody listens on now: two test runs on one machine must not share one."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = {"chelsea": "a cat sitting on a red sofa", "coffee": "a cup of coffee on a saucer",
          "rocket": "a rocket on its launch pad", "astronaut": "an astronaut with a flag",
          "camera": "a man holding a camera", "clock": "a clock on a wall"}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gallery")
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    (folder / "broken.jpg").write_bytes(b"not really a jpeg")
    with open(folder / "captions.csv", "w") as f:
        f.write("image,caption\n" + "".join(f"{n}.png,{c}\n" for n, c in PHOTOS.items()))
    return folder


def build(kit, gallery):
    files = [gallery / f"{n}.png" for n in PHOTOS]
    return Index.build(kit, files, list(PHOTOS.values()))


def test_offline_text_and_image_search(offline_kit, gallery):
    index = build(offline_kit, gallery)
    assert Path(index.search("a cat", k=1)[0][0]).stem == "chelsea"
    assert Path(index.search("a cup of coffee", k=1)[0][0]).stem == "coffee"
    by_image = index.search(image=str(gallery / "rocket.png"), k=2)
    assert Path(by_image[0][0]).stem == "rocket" and by_image[0][1] > 0.99
    scores = [s for _, s in index.search("a rocket", k=6)]
    assert scores == sorted(scores, reverse=True)
    recall = index.recall()
    assert recall["i2t_r5"] >= 0.8 and recall["t2i_r5"] >= 0.8


def test_vector_weighted_and_negative_queries(tiny_kit, gallery):
    index = build(tiny_kit, gallery)
    enc = tiny_kit.encoder()
    cat, rocket = enc.encode_texts(["a cat"])[0], enc.encode_texts(["a rocket"])[0]
    assert index.search(vector=cat, k=3) == index.search("a cat", k=3)
    want = torch.nn.functional.normalize(cat - 0.5 * rocket, dim=0)
    scores = index.vectors @ want
    got = index.search("a cat", k=6, negative=[("a rocket", 0.5)])
    assert [pid for pid, _ in got] == [index.ids[i] for i in scores.argsort(descending=True)]
    with pytest.raises(InputError, match="numbers"):
        index.search(vector=torch.ones(3))


def test_add_embeds_only_unseen_content_and_remove(tiny_kit, gallery, tmp_path):
    index = build(tiny_kit, gallery)
    n = len(index)
    copy = tmp_path / "same-cat.png"
    copy.write_bytes((gallery / "chelsea.png").read_bytes())
    report = index.add([copy, gallery / "broken.jpg", gallery / "coffee.png"])
    assert report["added"] == 0 and report["duplicates"] == 2
    assert report["errors"][0][0].endswith("broken.jpg")
    assert len(index) == n
    assert index.remove(str(gallery / "chelsea.png")) == 1 and index.remove(0) == 1
    assert len(index) == n - 2 and str(gallery / "chelsea.png") not in index.ids
    with pytest.raises(InputError):
        index.remove("nope")


def test_stop_event_keeps_what_was_embedded(tiny_kit, gallery):
    import threading

    stop = threading.Event()
    stop.set()
    index = Index(tiny_kit.encoder())
    report = index.add([gallery / f"{n}.png" for n in PHOTOS], stop_event=stop)
    assert report["stopped"] and len(index) == 0


def test_save_load_and_refusals(tiny_kit, offline_kit, gallery, tmp_path):
    index = build(tiny_kit, gallery)
    index.save(tmp_path / "idx")
    again = Index.load(tmp_path / "idx", tiny_kit)
    assert again.search("a cat", k=3) == index.search("a cat", k=3)
    assert again.thumbnails == index.thumbnails and all(index.thumbnails)
    with pytest.raises(InputError, match="built with"):
        Index.load(tmp_path / "idx", offline_kit)
    # an interrupted save leaves the old index intact
    with pytest.raises(RuntimeError):
        with cache.atomic_folder(tmp_path / "idx", index_mod.FORMAT) as tmp:
            (tmp / "meta.json").write_text("{}")
            raise RuntimeError("power cut")
    assert len(Index.load(tmp_path / "idx", tiny_kit)) == len(index)
    # tampered or partial folders
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    meta["ids"] = meta["ids"][:-1]
    (tmp_path / "idx" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="disagree"):
        Index.load(tmp_path / "idx", tiny_kit)
    (tmp_path / "idx" / "vectors.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="damaged"):
        Index.load(tmp_path / "idx", tiny_kit)
    (tmp_path / "idx" / cache.MARKER).unlink()
    with pytest.raises(InputError, match="not a complete"):
        Index.load(tmp_path / "idx", tiny_kit)


def test_export(tiny_kit, gallery, tmp_path):
    index = build(tiny_kit, gallery)
    npz = np.load(index.export(tmp_path / "e.npz"))
    assert npz["vectors"].shape == tuple(index.vectors.shape)
    assert list(npz["captions"]) == index.captions
    lines = index.export(tmp_path / "e.csv").read_text().splitlines()
    assert lines[0] == "id,caption,vector" and len(lines) == len(index) + 1


def test_faiss_path_agrees_with_exact(tiny_kit, monkeypatch):
    enc = tiny_kit.encoder()
    index = Index(enc)
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(50, enc.dim, generator=g), dim=-1)
    vecs = torch.nn.functional.normalize(
        centres[torch.randint(0, 50, (5000,), generator=g)] +
        0.3 * torch.randn(5000, enc.dim, generator=g) / enc.dim ** 0.5, dim=-1)
    index._append(vecs, [(f"v{i}", "", str(i)) for i in range(5000)])
    exact = index.search(vector=vecs[7], k=10)
    monkeypatch.setattr(index_mod, "FAISS_THRESHOLD", 1000)
    approx = index.search(vector=vecs[7], k=10)
    assert approx[0][0] == "v7"
    assert len({p for p, _ in exact} & {p for p, _ in approx}) >= 9


def test_cli_and_two_process_build_equal_one_process(tiny_kit, gallery, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, "-m", "mmcore.index", "build", str(gallery), "--out",
                          str(tmp_path / "one"), "--kit", "tiny", "--captions",
                          str(gallery / "captions.csv")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), "-m", "mmcore.index", "build", str(gallery),
                          "--out", str(tmp_path / "two"), "--kit", "tiny", "--captions",
                          str(gallery / "captions.csv")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = Index.load(tmp_path / "one", tiny_kit), Index.load(tmp_path / "two", tiny_kit)
    assert a.ids == b.ids and a.captions == b.captions and len(a) == len(PHOTOS)
    torch.testing.assert_close(a.vectors, b.vectors, rtol=0, atol=1e-6)
    assert not list(tmp_path.glob("*.shard*"))
    found = subprocess.run([sys.executable, "-m", "mmcore.index", "search", str(tmp_path / "one"),
                            "a cat", "-k", "2", "--kit", "tiny"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert found.returncode == 0 and len(found.stdout.strip().splitlines()) == 2


def test_a_string_is_always_text_and_images_are_explicit(tiny_kit, gallery):
    index = build(tiny_kit, gallery)
    path = str(gallery / "rocket.png")                     # exists, and is in the index
    as_text = index.search(path, k=6)
    want = index.vectors @ tiny_kit.encoder().encode_texts([path])[0]
    assert [s for _, s in as_text] == pytest.approx(sorted(want.tolist(), reverse=True), abs=1e-5)
    assert as_text[0][1] < 0.99                            # an image query would score ~1.0
    assert index.search(image=path, k=1)[0][1] > 0.99
    png = (gallery / "rocket.png").read_bytes()
    assert index.search(image=png, k=1)[0][0] == path       # bytes are an image
    with pytest.raises(InputError, match="k= by name"):
        index.search("a cat", 3)
    with pytest.raises(InputError, match="negative term"):
        index.search("a cat", negative=gallery / "rocket.png")   # a Path is never guessed
    with pytest.raises(InputError, match="string"):
        index.search(text=png)
    with pytest.raises(InputError, match="finite"):
        index.search("a cat", k=float("nan"))


def test_ids_are_given_names_made_unique_with_thumbnails(tiny_kit, gallery):
    index = Index(tiny_kit.encoder())
    images = [gallery / "chelsea.png", (gallery / "coffee.png").read_bytes()]
    report = index.add(images, ids=["x.png", "x.png"])
    assert report["added"] == 2 and index.ids == ["x.png", "x.png (2)"]
    for thumb in index.thumbnails:
        im = Image.open(__import__("io").BytesIO(thumb))
        assert im.format == "JPEG" and max(im.size) <= index_mod.THUMBNAIL


def test_a_tampered_index_is_refused_without_naming_the_folder(tiny_kit, gallery, tmp_path):
    from safetensors.torch import load_file, save_file

    build(tiny_kit, gallery).save(tmp_path / "idx")
    meta_path, vec_path = tmp_path / "idx" / "meta.json", tmp_path / "idx" / "vectors.safetensors"
    meta, tensors = json.loads(meta_path.read_text()), load_file(str(vec_path))

    def refused(new_meta, new_tensors, match):
        meta_path.write_text(json.dumps(new_meta))
        save_file(new_tensors, str(vec_path))
        with pytest.raises(InputError, match=match) as err:
            Index.load(tmp_path / "idx", tiny_kit)
        assert str(tmp_path) not in str(err.value)

    refused({**meta, "ids": [1] * len(meta["ids"])}, tensors, "lists of text")
    refused({**meta, "captions": ["x" * 20_000] * len(meta["ids"])}, tensors, "longer")
    refused(meta, {**tensors, "vectors": tensors["vectors"] * float("nan")}, "finite")
    vectors = tensors["vectors"]
    # finite as float64, infinite as the float32 it is searched in
    refused(meta, {**tensors, "vectors": vectors.double() * 1e300}, "finite")
    refused(meta, {**tensors, "vectors": vectors[:, :5].contiguous()},
            f"5 numbers each; this model's have {vectors.shape[1]}")
    refused(meta, {**tensors, "vectors": vectors * 3e3}, "unit length")    # not cosines
    refused(meta, {**tensors, "vectors": vectors * 0}, "unit length")
    refused(meta, {**tensors, "thumbnail_offsets": tensors["thumbnail_offsets"].flip(0)},
            "out of order")
    refused({**meta, "identity": "hf-clip:another"}, tensors, "another model")
    meta_path.write_text(json.dumps(meta))
    save_file(tensors, str(vec_path))
    assert len(Index.load(tmp_path / "idx", tiny_kit)) == len(PHOTOS)


def test_a_local_model_identity_names_no_server_path(tiny_kit):
    identity = tiny_kit.encoder().identity
    assert identity.startswith("hf-clip:") and "/" not in identity
