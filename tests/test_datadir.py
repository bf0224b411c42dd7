"""The data dir: what a server makes outlives a restart; half-written folders do not."""

import json

import pytest

from mmcore import cache
from mmcore.datadir import DataDir


def complete_model(folder):
    folder.mkdir(parents=True)
    (folder / "head.safetensors").write_bytes(b"x")
    (folder / cache.MARKER).write_text(json.dumps({"key": "mmcore-finetune-1"}))


def test_restart_lists_finished_models_resumes_cut_runs_and_drops_temp_folders(tmp_path):
    data = DataDir(tmp_path)
    data.prepare()
    done, cut, stopped, failed = (data.new_run({"epochs": i}) for i in range(1, 5))
    for run in (done, cut, stopped, failed):
        complete_model(data.model(run))
        data.data(run).mkdir()
    data.finish(done, "finished")
    data.finish(stopped, "stopped")
    data.finish(failed, "failed", "loss became NaN")
    complete_model(data.models / "by-hand")                   # the operator's own model
    (data.models / ".tmp-x-1").mkdir()
    (data.runs / cut.name / "run.json").with_name("junk").mkdir()
    (data.runs / "broken").mkdir()
    (data.runs / "broken" / "run.json").write_text("{not json")

    again = DataDir(tmp_path)                                  # the server restarts
    assert again.prepare() == [".tmp-x-1"]
    assert set(again.finished_models()) == {done.name, stopped.name, "by-hand"}
    assert set(again.resumable()) == {cut.name, stopped.name}
    assert not again.data(done).exists() and not again.data(failed).exists()
    assert again.load(cut.name).options == {"epochs": 2}
    assert len({r.name for r in again.all_runs()}) == 4


def test_a_cut_run_resumes_only_in_its_own_session_until_the_server_restarts(tmp_path):
    data = DataDir(tmp_path)
    data.prepare()
    mine, ownerless = data.new_run({}, "mine"), data.new_run({}, "by-hand")
    data.claim(mine, "session-a")
    for run in (mine, ownerless):
        data.data(run).mkdir()
    data.finish(mine, "stopped")
    assert data.load("mine").owner == "session-a"
    assert set(data.resumable("session-a")) == {"mine", "by-hand"}
    assert data.resumable("session-b") == data.resumable(None) == ["by-hand"]
    again = DataDir(tmp_path)                   # a restart: the session that ran it is gone
    assert set(again.resumable("session-b")) == set(again.resumable(None)) == {"mine",
                                                                               "by-hand"}


def test_a_resume_key_opens_a_run_to_another_session_and_full_data_drops_scratch_first(
        tmp_path):
    data = DataDir(tmp_path)
    data.prepare()
    old, new = data.new_run({}, "old"), data.new_run({}, "new")
    old.started, new.started = 1.0, 2.0
    keys = {run.name: data.claim(run, "session-a") for run in (old, new)}
    for run in (old, new):
        data.data(run).mkdir()
        (data.data(run) / "images.bin").write_bytes(b"\0" * 1000)
        complete_model(data.model(run))
        data.finish(run, "stopped")
    assert data.resumable("session-b") == []
    assert data.may_resume(data.load("old"), "session-b", keys["old"])
    assert not data.may_resume(data.load("old"), "session-b", keys["new"])
    assert not data.may_resume(data.load("old"), "session-b", "")
    assert "old" not in data.load("old").key                 # only a digest is kept
    # the data dir is full: the oldest cut-short run's data goes, its model stays
    assert data.free_cut_short(500) == ["old"]
    assert data.resumable("session-a") == ["new"]
    assert set(data.finished_models()) == {"old", "new"}


def test_a_run_takes_the_users_name_or_refuses_it(tmp_path):
    from mmcore import InputError
    from mmcore.datadir import DataDir

    data = DataDir(tmp_path)
    data.prepare()
    assert data.new_run({}, "shapes-v1").name == "shapes-v1"
    assert data.new_run({}, "shapes-v1").name == "shapes-v1-2"       # taken: numbered
    assert data.new_run({}, "").name.startswith("finetuned-")
    for bad in ("../up", "a/b", ".hidden", "x" * 61, "name with spaces"):
        with pytest.raises(InputError, match="A run name uses"):
            data.new_run({}, bad)
