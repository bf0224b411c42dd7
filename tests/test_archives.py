"""Zip uploads: zip-slip, symlinks, bombs, encrypted and junk entries never get through."""

import io
import stat
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


def test_good_entries_extract_and_bad_ones_are_listed(tmp_path):
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
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="Not a readable .zip"):
        archives.safe_extract(tmp_path / "junk.zip")
    monkeypatch.setattr(archives, "MAX_ENTRIES", 3)
    z = make_zip(tmp_path / "many.zip", [(f"{i}.png", b"x") for i in range(4)])
    with pytest.raises(InputError, match="limit is 3"):
        archives.safe_extract(z)
