"""Zip uploads: zip-slip, symlinks, bombs, encrypted and junk entries never get through."""

import io
import stat
import tempfile
import zipfile

import pytest

from mmcore import InputError, archives


def make_zip(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in entries:
            if isinstance(content, zipfile.ZipInfo):
                zf.writestr(content, b"target")
            else:
                zf.writestr(name, content)
    return path


def test_good_entries_extract_and_bad_ones_are_listed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))     # its default folder: here
    link = zipfile.ZipInfo("link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    z = make_zip(tmp_path / "a.zip", [
        ("photos/cat.png", b"png-bytes"), ("../evil.png", b"x"), ("/abs.png", b"x"),
        ("__MACOSX/._cat.png", b"x"), (".hidden.png", b"x"), ("notes.exe", b"x"),
        ("link.png", link), ("bomb.png", b"\0" * 5_000_000)])
    folder, files, skipped = archives.safe_extract(z, suffixes=(".png",))
    assert [f.relative_to(folder).as_posix() for f in files] == ["photos/cat.png"]
    reasons = dict(skipped)
    assert reasons["../evil.png"] == "unsafe path" and reasons["/abs.png"] == "unsafe path"
    assert reasons["link.png"] == "symbolic link"
    assert "not a supported" in reasons["notes.exe"] and "ratio" in reasons["bomb.png"]
    assert not (tmp_path / "evil.png").exists()
    assert "__MACOSX/._cat.png" not in reasons                          # silently skipped


def test_whole_archive_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="Not a readable .zip"):
        archives.safe_extract(tmp_path / "junk.zip")
    monkeypatch.setattr(archives, "MAX_ENTRIES", 3)
    z = make_zip(tmp_path / "many.zip", [(f"{i}.png", b"x") for i in range(4)])
    with pytest.raises(InputError, match="limit is 3"):
        archives.safe_extract(z)


def test_odd_entries_are_skipped_with_a_reason(tmp_path):
    """Names '.', '', 300 characters, 2,100 folders deep, a file that is also a folder and
    damaged deflate data: each is a skipped entry, never an exception."""
    with zipfile.ZipFile(tmp_path / "odd.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good.png", b"good")
        for name in (".", "", "n" * 300 + ".png", "d/" * 2100 + "deep.png", "x.png",
                     "x.png/y.png"):
            zf.writestr(zipfile.ZipInfo(name) if name in (".", "") else name, b"data")
        zf.writestr("damaged.png", bytes(range(256)) * 400)
    blob = bytearray((tmp_path / "odd.zip").read_bytes())
    info = zipfile.ZipFile(tmp_path / "odd.zip").getinfo("damaged.png")
    start = info.header_offset + 30 + len(info.filename) + 10
    blob[start:start + 60] = b"\xff" * 60
    (tmp_path / "odd.zip").write_bytes(bytes(blob))
    folder, files, skipped = archives.safe_extract(tmp_path / "odd.zip", dest=tmp_path / "out")
    assert folder == tmp_path / "out"
    assert sorted(f.name for f in files) == ["good.png", "x.png"]
    reasons = [why for _, why in skipped]
    assert reasons.count("empty name") == 2 and "name too long" in reasons
    assert any("deep" in why for why in reasons)
    assert "a file and a folder share this name" in reasons
    assert any(name == "damaged.png" for name, _ in skipped)
    assert all(str(tmp_path) not in why and len(name) < 100 for name, why in skipped)
    assert not (folder / "damaged.png").exists()


def test_a_disk_budget_is_checked_before_writing(tmp_path):
    z = make_zip(tmp_path / "b.zip", [(f"{i}.png", bytes(range(256)) * 40) for i in range(5)])
    with pytest.raises(InputError, match="disk left"):
        archives.safe_extract(z, dest=tmp_path / "out", budget=20_000)
    assert not list((tmp_path / "out").rglob("*.png")) if (tmp_path / "out").exists() else True
    folder, files, _ = archives.safe_extract(z, dest=tmp_path / "out", budget=60_000)
    assert len(files) == 5 and archives.size_of(folder) == 5 * 256 * 40
