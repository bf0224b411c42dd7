"""mmcore-train as people run it: help with defaults and choices, the data report on stderr
(each skipped file with its reason), a progress bar, exit statuses, no tracebacks."""

import pytest

from mmcore import demo_data, train


@pytest.fixture()
def data(tmp_path):
    folder = demo_data.make(tmp_path / "data", photos=False)
    (folder / "red-circle-small-left.png").write_bytes(b"not a png")          # unreadable
    (folder / "stray.png").write_bytes((folder / "blue-square-large-right.png").read_bytes())
    return folder


def run(capsys, *args):
    code = train.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_names_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as done:
        train.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "{projections,text,image}" in text and "{offline,hub,tiny}" in text
    assert "(default: 5)" in text and "in-batch negatives" in text


def test_a_run_reports_skipped_files_and_trains(data, tmp_path, capsys):
    code, out, err = run(capsys, data, "--out", tmp_path / "ck", "--kit", "tiny",
                         "--epochs", "1", "--batch-size", "8", "--workers", "0")
    assert code == 0, err
    assert "skipped red-circle-small-left.png: " in err and "not an image" in err
    assert "skipped stray.png: no caption" in err
    assert "usable image-caption pairs" in err and "training" in err          # the bar
    assert "checkpoint " in out and "Traceback" not in err
    assert (tmp_path / "ck").is_dir()


def test_nothing_usable_exits_1_and_saves_nothing(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    (folder / "captions.csv").write_text("image,caption\na.png,a cat\n")
    code, out, err = run(capsys, folder, "--out", tmp_path / "ck", "--kit", "tiny")
    assert code == 1 and out == ""
    assert "skipped a.png: " in err and "fewer than two usable" in err
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("args, code, message", [
    (["--kit", "nope"], 2, "invalid choice: 'nope'"),
    (["--train", "everything"], 2, "invalid choice: 'everything'"),
    (["--lr", "nan", "--kit", "tiny"], 2, "lr must be a finite number"),
    (["--kit", "hub"], 1, "error: "),
])
def test_bad_arguments_and_a_model_that_cannot_load(data, tmp_path, capsys, args, code,
                                                     message):
    try:
        got, out, err = run(capsys, data, "--out", tmp_path / "ck", *args)
    except SystemExit as exc:                          # argparse's own refusal
        got, err = exc.code, capsys.readouterr().err
    assert got == code and message in err and "Traceback" not in err
