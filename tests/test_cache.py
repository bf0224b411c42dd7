"""Saving never deletes what is not ours (issue 11.9): atomic folder writes refuse a folder
of the user's own files unless told to overwrite, and keep the umask's permissions."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmcore
from mmcore import cache

ROOT = Path(__file__).resolve().parent.parent


def users_folder(tmp_path) -> Path:
    folder = tmp_path / "my-thesis"
    folder.mkdir()
    (folder / "chapter1.txt").write_text("years of work")
    return folder


def write(folder, overwrite=False, text="new"):
    with cache.atomic_folder(folder, "test", overwrite=overwrite) as tmp:
        (tmp / "data.txt").write_text(text)


def test_a_folder_of_the_users_files_is_refused(tmp_path):
    folder = users_folder(tmp_path)
    with pytest.raises(mmcore.InputError, match="did not write") as err:
        write(folder)
    assert str(tmp_path) not in str(err.value)              # no server path in the message
    assert (folder / "chapter1.txt").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir()] == ["my-thesis"]    # no temp left behind


def test_overwrite_replaces_it_and_our_own_folders_are_replaced_anyway(tmp_path):
    folder = users_folder(tmp_path)
    write(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["data.txt", cache.MARKER]
    write(folder, text="again")                              # ours now: no flag needed
    assert (folder / "data.txt").read_text() == "again"
    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty)
    assert cache.is_complete(empty, "test")


def test_a_file_or_a_link_at_the_target_is_refused(tmp_path):
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(mmcore.InputError, match="not an mmcore folder"):
        write(tmp_path / "notes")
    target = users_folder(tmp_path)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(mmcore.InputError):
        write(tmp_path / "link")
    write(tmp_path / "link", overwrite=True)                 # replaces the link, not its target
    assert (target / "chapter1.txt").exists() and not (tmp_path / "link").is_symlink()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_the_new_folder_has_the_umasks_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        write(tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask


def test_index_save_follows_the_same_rule(tiny_kit, chelsea, tmp_path):
    index = mmcore.Index.build(tiny_kit, [chelsea], ["a cat"])
    folder = users_folder(tmp_path)
    with pytest.raises(mmcore.InputError, match="overwrite"):
        index.save(folder)
    assert (folder / "chapter1.txt").exists()
    index.save(folder, overwrite=True)
    assert len(mmcore.Index.load(folder, tiny_kit)) == 1
    index.save(folder)                                       # an index of ours: replaced


def test_finetune_refuses_before_training(tiny_kit, tmp_path):
    from mmcore import demo_data

    data = demo_data.make(tmp_path / "data", photos=False)
    folder = users_folder(tmp_path)
    with pytest.raises(mmcore.InputError, match="overwrite"):
        mmcore.finetune(tiny_kit, data, folder, epochs=1, batch_size=16)
    assert sorted(p.name for p in folder.iterdir()) == ["chapter1.txt"]


@pytest.mark.parametrize("command", [["mmcore.train", "DATA", "--epochs", "1"],
                                     ["mmcore.index", "build", "DATA"]])
def test_clis_refuse_the_users_folder(tmp_path, command):
    from mmcore import demo_data

    data = demo_data.make(tmp_path / "data", photos=False)
    folder = users_folder(tmp_path)
    args = [str(data) if a == "DATA" else a for a in command]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", *args, "--out", str(folder), "--kit", "tiny"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--overwrite" in out.stderr and "Traceback" not in out.stderr   # errors: stderr
    assert sorted(p.name for p in folder.iterdir()) == ["chapter1.txt"]
