"""Training data: every caption format, a validation report of what is wrong, seeded splits."""

import json
import tempfile
import zipfile

import pytest
from PIL import Image

from mmcore import InputError
from mmcore.train_data import load_pairs, split


def images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (16, 16), (i * 40 % 255, 80, 120)).save(folder / name)


def test_csv_with_every_problem_reported(tmp_path):
    images(tmp_path, ["a.png", "b.png", "c.png", "d.png", "e.png"])
    (tmp_path / "broken.png").write_bytes(b"junk")
    (tmp_path / "captions.csv").write_bytes(
        "\ufeffimage,caption\na.png,a red square\nb.png,a red square\nc.png,\n"
        "broken.png,junk\nmissing.png,ghost\n\"d.png\",\"two\nlines\"\n".encode("utf-8"))
    report = load_pairs(tmp_path)
    assert sorted(p.image.name for p in report.pairs) == ["a.png", "b.png", "d.png"]
    assert report.missing_images == ["missing.png"] and report.uncaptioned == ["e.png"]
    assert report.empty_captions == ["c.png"] and report.unreadable[0][0] == "broken.png"
    assert report.duplicate_captions == ["a red square"]
    assert [p.caption for p in report.pairs if p.image.name == "d.png"] == ["two lines"]
    text = report.summary()
    assert "3 usable" in text and "missing.png" in text and "e.png" in text


def test_utf16_csv_jsonl_and_sidecars(tmp_path):
    images(tmp_path / "u", ["x.png"])
    (tmp_path / "u" / "captions.csv").write_bytes("image,caption\nx.png,café\n".encode("utf-16"))
    report = load_pairs(tmp_path / "u")
    assert report.pairs[0].caption == "café" and any("UTF-16" in n for n in report.notices)
    images(tmp_path / "j", ["x.png", "y.png"])
    (tmp_path / "j" / "captions.jsonl").write_text(
        json.dumps({"image": "x.png", "caption": "an x"}) + "\nnot json\n[1, 2]\n7\n\"y.png\"\n"
        + json.dumps({"image": ["y.png"], "caption": "a list"}) + "\n"
        + json.dumps({"image": "y.png", "caption": 1984}) + "\n")      # a number: its text
    report = load_pairs(tmp_path / "j")
    assert [p.caption for p in report.pairs] == ["an x", "1984"]
    skipped = [n for n in report.notices if "not an object" in n]      # JSON, not an object
    assert [n.split()[2] for n in skipped] == ["2", "3", "4", "5", "6"], report.notices
    images(tmp_path / "s", ["x.png"])
    (tmp_path / "s" / "x.txt").write_bytes("caf\xe9 au lait".encode("cp1252"))
    assert load_pairs(tmp_path / "s").pairs[0].caption == "café au lait"


def test_zip_upload_is_extracted_safely(tmp_path):
    images(tmp_path / "src", ["a.png"])
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        zf.write(tmp_path / "src" / "a.png", "data/a.png")
        zf.writestr("data/captions.csv", "image,caption\na.png,a square\n../../x.png,evil\n")
        zf.writestr("../../escape.txt", "x")
    report = load_pairs(tmp_path / "d.zip")
    assert [p.caption for p in report.pairs] == ["a square"]
    assert any("unsafe path" in n for n in report.notices)
    assert report.missing_images == ["../x.png"]


def test_a_zips_extracted_files_live_as_long_as_its_report(tmp_path, monkeypatch):
    import gc

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "sys"))
    (tmp_path / "sys").mkdir()
    images(tmp_path / "src", ["a.png", "b.png"])
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        for name in ("a.png", "b.png"):
            zf.write(tmp_path / "src" / name, name)
        zf.writestr("captions.csv", "image,caption\na.png,a square\nb.png,another\n")
    report = load_pairs(tmp_path / "d.zip")
    assert all(p.image.is_file() for p in report.pairs)      # training reads them later
    del report
    gc.collect()
    assert list((tmp_path / "sys").iterdir()) == []           # nothing left in the temp folder


def test_nothing_usable_is_a_clear_error(tmp_path):
    images(tmp_path, ["a.png"])
    with pytest.raises(InputError, match="No usable image-caption pairs"):
        load_pairs(tmp_path)
    with pytest.raises(InputError, match="folder or a .zip"):
        load_pairs(tmp_path / "a.png")


def test_split_is_seeded_and_disjoint():
    pairs = list(range(50))
    train, val = split(pairs, 0.2, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == pairs
    assert split(pairs, 0.2, seed=3) == (train, val)
    assert split(pairs, 0.2, seed=4) != (train, val)
    small_train, small_val = split([1, 2], 0.2)
    assert len(small_train) == len(small_val) == 1 and set(small_train + small_val) == {1, 2}
