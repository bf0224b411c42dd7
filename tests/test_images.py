"""The one image loader: every hazard in HARDENING.md gives a clean image or a clear error."""

import io

import numpy as np
import pytest
from PIL import Image

from mmcore import InputError
from mmcore.images import MAX_PIXELS, load_image, load_images


def saved(im, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_declared_huge_image_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(saved(Image.new("1", (10_000, 9_000))))       # 90 Mpx in a small file
    assert path.stat().st_size < 200_000
    with pytest.raises(InputError, match=f"limit is {MAX_PIXELS:,}"):
        load_image(path)


def test_truncated_and_non_image_files(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    good = saved(Image.fromarray(noise), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) * 6 // 10])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(tmp_path / "cut.jpg")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not an image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_transparency_goes_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))                # fully transparent red
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 0))
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    assert load_image(Image.open(io.BytesIO(saved(p)))).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped():
    arr = np.full((4, 4), 32768, dtype=np.uint16)                     # mid grey in 16 bits
    im = Image.fromarray(arr)
    assert im.mode.startswith("I;16")
    assert abs(load_image(im).getpixel((0, 0))[0] - 128) <= 1


def test_other_modes_become_rgb():
    for im in (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), Image.new("1", (4, 4), 1),
               Image.new("L", (4, 4), 7), Image.new("F", (4, 4), 0.5)):
        out = load_image(im)
        assert out.mode == "RGB" and out.size == (4, 4)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    r, g, b = load_image(buf.getvalue()).getpixel((0, 0))
    assert r > 200 and b < 50


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6                                                   # rotate 90 on display
    out = load_image(saved(im, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_degenerate_sizes():
    assert load_image(Image.new("RGB", (1, 1))).size == (1, 1)
    with pytest.raises(InputError, match="too thin"):
        load_image(Image.new("L", (1, 100_000)))
    with pytest.raises(InputError, match="empty"):
        load_image(Image.new("RGB", (0, 0)))


def test_one_bad_file_in_a_batch_is_reported_and_skipped(tmp_path):
    (tmp_path / "a.png").write_bytes(saved(Image.new("RGB", (8, 8))))
    (tmp_path / "b.png").write_bytes(b"not a png")
    images, errors = load_images([tmp_path / "a.png", tmp_path / "b.png"])
    assert len(images) == 1 and errors[0][0] == "b.png" and "not an image" in errors[0][1]


def test_junk_exif_loads_and_a_loaded_image_loads_again():
    """Junk EXIF made the second pass (a decoded image handed back to the loader, as batch
    and gallery code does) fail although the file alone worked: orientation is applied once."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buf, "JPEG", exif=b"Exif\x00\x00" + b"\x00" * 20)
    first = load_image(buf.getvalue())
    again = load_image(first)
    assert again.size == (40, 30) and "exif" not in again.info
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6                                   # rotate 90 degrees on display
    Image.new("RGB", (40, 30), "red").save(rotated, "JPEG", exif=exif)
    once = load_image(rotated.getvalue())
    assert once.size == (30, 40) and load_image(once).size == (30, 40)   # not turned twice


def test_loading_on_many_threads_leaves_the_warning_filters_alone():
    """Gallery photos load on several threads at once (dual_encoder.decode_all). The loader
    silences Pillow's warnings around its header read and EXIF parsing; done with
    `warnings.catch_warnings` unguarded, one thread restored a filter list holding the
    other's "ignore everything", and every warning in the process went silent."""
    import threading
    import warnings

    exif = Image.Exif()
    exif[0x0112] = 6
    photos = [saved(Image.new("RGB", (64, 48), "red"), "JPEG", exif=exif.tobytes()),
              saved(Image.new("RGB", (48, 64), "blue"), "PNG")]
    before = list(warnings.filters)
    start = threading.Barrier(4)

    def load_many(i):
        start.wait()
        for _ in range(200):
            load_image(photos[i % 2])

    threads = [threading.Thread(target=load_many, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warnings.filters == before
