"""User CSV files: encodings, odd rows and limits; formula cells neutralised on export."""

import csv
import tempfile

import pytest

from mmcore import InputError, tables


@pytest.mark.parametrize("encoding, raw_prefix", [("utf-8-sig", b"\xef\xbb\xbf"),
                                                  ("utf-16", b""), ("cp1252", b"")])
def test_encodings(tmp_path, encoding, raw_prefix):
    path = tmp_path / "x.csv"
    path.write_bytes("sentence\ncafé [MASK]\n".encode(encoding))
    rows, notices = tables.read_csv(path, ["sentence"])
    assert rows == [{"sentence": "café [MASK]"}]


def test_nul_bytes_missing_cells_and_no_header(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"first,second\na\x00b,\n,\nc,d\n")
    rows, _ = tables.read_csv(path, ["first", "second"])
    assert rows == [{"first": "ab", "second": ""}, {"first": "c", "second": "d"}]
    path.write_text("hello [MASK]\nbye [MASK]\n")
    rows, notices = tables.read_csv(path, ["sentence"])
    assert [r["sentence"] for r in rows] == ["hello [MASK]", "bye [MASK]"]
    assert "first 1 column" in notices[0]


def test_limits(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("sentence\n" + "a\n" * 50)
    rows, notices = tables.read_csv(path, ["sentence"], max_rows=10)
    assert len(rows) == 10 and "only the first 10" in notices[0]
    path.write_bytes(b"a" * (tables.MAX_BYTES + 1))
    with pytest.raises(InputError, match="limit"):
        tables.read_csv(path, ["sentence"])
    path.write_text("")
    with pytest.raises(InputError, match="no rows"):
        tables.read_csv(path, ["sentence"])
    path.write_text("a\n")
    with pytest.raises(InputError, match="needs the column"):
        tables.read_csv(path, ["first", "second"])


def test_export_neutralises_formulas(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))     # its default folder: here
    out = tables.write_csv([{"a": "=HYPERLINK(\"x\")", "b": "+1"}, {"a": "@SUM", "b": "ok"}],
                           ["a", "b"])
    with open(out, encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows == [["a", "b"], ["'=HYPERLINK(\"x\")", "'+1"], ["'@SUM", "ok"]]


def test_formulas_after_spaces_newlines_or_in_full_width_are_neutralised():
    for cell in ["  =1+1", "\n=cmd|' /C calc'!A0", "\u3000+1", "＝1+1", "＋1", "－1", "＠SUM"]:
        assert tables.neutralise(cell) == "'" + cell
    assert tables.neutralise("a = b") == "a = b" and tables.neutralise("") == ""


def test_utf16_with_an_odd_byte_count_is_read(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_bytes(b"\xff\xfe" + "sentence\nthe [MASK] sat\n".encode("utf-16-le") + b"x")
    rows, notices = tables.read_csv(path, ["sentence"])
    assert rows[0]["sentence"] == "the [MASK] sat" and "UTF-16" in notices[0]
