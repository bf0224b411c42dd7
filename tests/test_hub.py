"""The hub code path: user-given checkpoints, compatibility checks, and no network."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mmcore
from mmcore import hub, tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    monkeypatch.setattr(hub, "_probe", {"at": 0.0, "ok": False})


def test_hub_kit_without_network_fails_fast_naming_offline():
    kit = mmcore.load_kit("hub")
    start = time.monotonic()
    with pytest.raises(mmcore.ModelUnavailable, match="--kit offline"):
        kit.preflight()
    with pytest.raises(mmcore.ModelUnavailable, match="--kit offline"):
        kit.model("causal_lm")
    assert time.monotonic() - start < 15


def test_app_with_hub_kit_exits_fast_and_clearly():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "app.py", "--kit", "hub"], cwd=ROOT, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--kit offline" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60


def test_user_folder_loads_through_the_hub_path(tiny_kit):
    folder = str(tiny.folder("gpt2"))
    kit = mmcore.load_kit("hub", causal_lm=folder)
    loaded = kit.model("causal_lm")
    assert type(loaded.model).__name__ == "GPT2LMHeadModel"
    # same checkpoint, same process: one model in memory
    assert loaded is tiny_kit.model("causal_lm")


def test_incompatible_architecture_is_refused_clearly():
    kit = mmcore.load_kit("tiny", masked_lm=str(tiny.folder("gpt2")),
                          dual_encoder=str(tiny.folder("bert")))
    with pytest.raises(mmcore.ModelUnavailable, match="'gpt2' model .*masked_lm role needs"):
        kit.model("masked_lm")
    with pytest.raises(mmcore.ModelUnavailable, match="dual_encoder role needs"):
        kit.model("dual_encoder")
    assert kit.describe()[0]["status"] == "error"


def test_missing_folder_and_uncached_hub_id_are_clear(tiny_kit):
    with pytest.raises(mmcore.ModelUnavailable, match="No such model folder"):
        mmcore.load_kit("tiny", causal_lm="/nonexistent/model").model("causal_lm")
    with pytest.raises(mmcore.ModelUnavailable, match="not in the local cache"):
        mmcore.load_kit("tiny", causal_lm="someone/some-model").model("causal_lm")


def test_pickle_checkpoints_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny.folder("gpt2"), folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(mmcore.ModelUnavailable, match="safetensors"):
        mmcore.load_kit("tiny", causal_lm=str(folder)).model("causal_lm")


def test_remote_code_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(mmcore.ModelUnavailable):
        mmcore.load_kit("tiny", causal_lm=str(folder)).model("causal_lm")
    assert not marker.exists()


def test_empty_model_name_is_an_input_error(tiny_kit):
    with pytest.raises(mmcore.InputError):
        mmcore.load_kit("tiny", causal_lm="   ")
