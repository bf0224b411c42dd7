"""Issue 12 item 8: a zero-shot batch row is what Classify gives for that image, with the
chosen dual encoder and threshold; rows follow the uploads (not their base names); one bad
file is a row, and an image with junk EXIF works in a batch and a gallery as it does alone."""

import io

import pytest
from gradio_client import Client, handle_file
from PIL import Image
from skimage import data

from appclient import launch, tuned_clip


@pytest.fixture(scope="module")
def served(tiny_kit, tmp_path_factory):
    demo, ctx, url = launch(["--kit", "tiny"])
    # a "fine-tuned" dual encoder: the tiny CLIP with its projections moved
    folder = tuned_clip(tmp_path_factory.mktemp("tuned") / "tuned-clip")
    ctx.checkpoints["tuned-clip"] = str(folder)
    yield demo, ctx, url
    demo.close()


def junk_exif_jpeg(path):
    Image.fromarray(data.coffee()).save(path, "JPEG", exif=b"Exif\x00\x00" + b"\x00" * 20)
    return path


def test_batch_rows_equal_single_calls_with_the_chosen_model_and_threshold(served, tmp_path):
    demo, ctx, url = served
    for sub in ("a", "b", "c"):
        (tmp_path / sub).mkdir()
    cat, rocket = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    Image.fromarray(data.chelsea()).save(cat)
    Image.fromarray(data.rocket()).save(rocket)
    bad = tmp_path / "c" / "y.gif"
    bad.write_bytes(b"GIF89a not really")
    exif = junk_exif_jpeg(tmp_path / "c" / "z.jpg")
    labels, client = "a cat, a rocket, a cup of coffee", Client(url, verbose=False)
    try:
        rows, csv_path, note = client.predict(
            [handle_file(str(p)) for p in (cat, rocket, bad, exif)], labels, "a photo of {}.",
            False, "cosine", 0.99, "tuned-clip", api_name="/zero_shot_batch")
        rows = rows["data"]
        assert [r[0] for r in rows] == ["x.png", "x.png", "y.gif", "z.jpg"]   # one per upload
        assert rows[2][4] and not rows[0][4] and not rows[1][4] and not rows[3][4]
        assert "3 classified, 1 skipped" in note
        for path, row in zip((cat, rocket, exif), (rows[0], rows[1], rows[3])):
            chart, table, notes = client.predict(handle_file(str(path)), labels,
                                                 "a photo of {}.", False, "cosine", 0.99,
                                                 "tuned-clip", api_name="/zero_shot")
            single = "; ".join(f"{r[0]}={r[1]:.4f}" for r in table["data"])
            assert row[3] == single                          # the same numbers, same order
        assert rows[0][3] != rows[1][3]                      # two files named x.png
        base = ctx.kit.zero_shot(str(cat), ["a cat", "a rocket", "a cup of coffee"],
                                 score="cosine")
        assert "; ".join(f"{lab}={v:.4f}" for lab, v in base) != rows[0][3]   # not the base
    finally:
        client.close()


def test_junk_exif_is_fine_in_a_gallery(served, tmp_path):
    demo, ctx, url = served
    client = Client(url, verbose=False)
    try:
        status = client.predict([handle_file(str(junk_exif_jpeg(tmp_path / "z.jpg")))],
                                "base model", api_name="/add_images")
        assert "1 images in the gallery (1 added" in status
        hits, _ = client.predict("a cup of coffee", None, "", 1, api_name="/search")
        im = Image.open(io.BytesIO(open(hits[0]["image"], "rb").read()))
        assert im.format == "JPEG" and hits[0]["caption"].endswith("z.jpg")
    finally:
        client.close()
