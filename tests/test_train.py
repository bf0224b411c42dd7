"""Fine-tuning: accumulation equals the full batch, two processes equal one, recall rises on
the offline kit, the shared model is untouched, checkpoints load and resume."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmcore
from mmcore import demo_data, losses, train


def free_port() -> int:
    """A port nobody listens on now: two test runs on one machine must not share one."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

ROOT = Path(__file__).resolve().parent.parent
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return demo_data.make(tmp_path_factory.mktemp("shapes"), photos=False)


def test_accumulated_gradients_equal_the_full_batch(offline_kit):
    enc = offline_kit.encoder().trainable_copy("projections", "t")
    model = train.Embed(enc)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(8, enc.cfg.image_dim, generator=g).softmax(-1)
    txt = torch.nn.functional.normalize(torch.randn(8, enc.cfg.text_dim, generator=g), dim=-1)
    grads = []
    for accum in (1, 4):
        enc.zero_grad()
        for p in enc.trainable_parameters("projections"):
            p.requires_grad_(True)
        loss, _ = train.step_loss(model, {"img_feats": img, "txt_feats": txt}, accum)
        grads.append([p.grad.clone() for p in enc.trainable_parameters("projections")])
    for full, acc in zip(*grads):
        torch.testing.assert_close(acc, full, rtol=1e-4, atol=1e-6)


def test_the_temperature_learns_from_a_start_of_100(offline_kit):
    """ConSE (like pretrained CLIP) starts at logit scale 100: its log must still get a
    gradient and move under the optimiser (CLIP clamps after the step, not in the forward)."""
    import math

    enc = offline_kit.encoder().trainable_copy("projections", "t")
    model = train.Embed(enc)
    start = float(enc.log_logit_scale.detach())
    assert start >= math.log(100)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(16, enc.cfg.image_dim, generator=g).softmax(-1)
    txt = torch.nn.functional.normalize(torch.randn(16, enc.cfg.text_dim, generator=g), dim=-1)
    params = enc.trainable_parameters("projections")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        train.step_loss(model, {"img_feats": img, "txt_feats": txt}, 1)
        assert float(enc.log_logit_scale.grad) != 0.0
        opt.step()
        losses.clamp_log_scale_(enc.log_logit_scale)
    assert float(enc.log_logit_scale) < start - 1e-3


def test_finetune_raises_recall_and_leaves_the_base_untouched(offline_kit, shapes, tmp_path):
    base = offline_kit.encoder()
    before_weights = base.image_projection.weight.clone()
    steps = []
    result = mmcore.finetune(offline_kit, shapes, tmp_path / "ckpt", epochs=30, batch_size=16,
                             lr=3e-3, seed=0, progress=steps.append)
    print("recall before", result.before, "after", result.after)
    assert result.after["i2t_r1"] >= result.before["i2t_r1"] + 0.2
    assert result.after["t2i_r5"] > result.before["t2i_r5"]
    assert steps and steps[-1]["loss"] < steps[0]["loss"]
    assert torch.equal(base.image_projection.weight, before_weights)   # the shared one
    assert (tmp_path / "ckpt" / "head.safetensors").exists()
    # the checkpoint is a dual encoder any tab can use
    tuned = mmcore.load_kit("offline", dual_encoder=str(tmp_path / "ckpt"))
    top = tuned.zero_shot(shapes / "red-circle-large-left.png",
                          ["a large red circle on the left", "a small blue square on the right"])
    assert top[0][0] == "a large red circle on the left"
    # deterministic on the CPU
    again = mmcore.finetune(offline_kit, shapes, tmp_path / "ckpt2", epochs=30, batch_size=16,
                            lr=3e-3, seed=0)
    assert again.after == result.after


def test_stop_keeps_a_checkpoint_and_resume_finishes(offline_kit, shapes, tmp_path):
    import threading

    stop = threading.Event()

    def halt(row):
        if row["step"] == 3:
            stop.set()

    first = mmcore.finetune(offline_kit, shapes, tmp_path / "r", epochs=4, batch_size=16,
                            stop_event=stop, progress=halt)
    assert first.stopped and len(first.history) == 3
    resumed = mmcore.finetune(offline_kit, shapes, tmp_path / "r", epochs=4, batch_size=16)
    assert not resumed.stopped and resumed.history[0]["step"] == 1
    assert resumed.history[-1]["step"] == resumed.history[-1]["steps"]


def test_bad_options_are_rejected(offline_kit, shapes, tmp_path):
    with pytest.raises(mmcore.InputError, match="train must be one of"):
        mmcore.finetune(offline_kit, shapes, tmp_path / "x", train="everything")
    with pytest.raises(mmcore.InputError, match="multiple of accum_steps"):
        mmcore.finetune(offline_kit, shapes, tmp_path / "x", batch_size=10, accum_steps=4)


def test_two_processes_give_the_loss_of_one_combined_batch(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(f"""
import os, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from mmcore import demo_data, losses, train
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
g = torch.Generator().manual_seed(0)
img = torch.nn.functional.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
txt = torch.nn.functional.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
mine = slice(rank * 4, rank * 4 + 4)
loss = losses.clip_loss(train.gather(img[mine]), train.gather(txt[mine]), torch.tensor(10.0))
full = losses.clip_loss(img, txt, torch.tensor(10.0))
assert abs(float(loss) - float(full)) < 1e-5, (float(loss), float(full))
print("rank", rank, "ok", float(loss))
torch.distributed.destroy_process_group()
sys.stdout.flush()
os._exit(0)     # past C++ static destructors: gloo's sometimes abort at exit (1 run in ~4)
""")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(script)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("ok") == 2


def test_cli_trains_and_reports(tmp_path):
    data = demo_data.make(tmp_path / "demo")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "mmcore.train", str(data), "--out",
                          str(tmp_path / "ck"), "--epochs", "2", "--batch-size", "16"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "after" in out.stdout and (tmp_path / "ck" / "head.safetensors").exists()


def test_clip_checkpoints_are_clipmodel_folders(tiny_kit, shapes, tmp_path):
    from transformers import CLIPModel

    before = [p.clone() for p in tiny_kit.encoder().model.text_projection.parameters()]
    result = mmcore.finetune(tiny_kit, shapes, tmp_path / "clip", epochs=2, batch_size=16,
                             train="text", lr=1e-3)
    assert len(result.history) == 2 * (len(shapes_pairs(shapes)) // 16)
    assert all(torch.equal(a, b) for a, b in
               zip(before, tiny_kit.encoder().model.text_projection.parameters()))
    exported = CLIPModel.from_pretrained(tmp_path / "clip")
    tuned = mmcore.load_kit("tiny", dual_encoder=str(tmp_path / "clip"))
    assert type(tuned.encoder().model) is type(exported)
    emb = tuned.encode_texts(["a large red circle on the left"])
    assert emb.shape[-1] == exported.config.projection_dim


def shapes_pairs(folder):
    from mmcore.train_data import load_pairs, split

    return split(load_pairs(folder).pairs, 0.2, 0)[0]


def test_models_first_used_under_inference_mode_can_still_be_fine_tuned(shapes, tmp_path,
                                                                         monkeypatch):
    from mmcore import kits

    monkeypatch.setattr(kits, "_registry", {})
    monkeypatch.setattr(kits, "_kits", {})
    with torch.inference_mode():
        kit = mmcore.load_kit("offline")
        kit.encode_texts(["warm up inside inference mode"])
    result = mmcore.finetune(kit, shapes, tmp_path / "x", epochs=1, batch_size=16, train="image")
    assert result.history


# ---------------------------------------------------------------- right answers (issues 11, 12)

def head(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "head.safetensors"))


def test_resume_equals_an_uninterrupted_run(offline_kit, shapes, tmp_path):
    """Stopped mid-epoch and resumed, a run ends with exactly the weights of one that never
    stopped: AdamW's moments and the schedule come back with the weights."""
    import threading

    kw = dict(epochs=3, batch_size=16, lr=3e-3, seed=0)
    full = mmcore.finetune(offline_kit, shapes, tmp_path / "full", **kw)
    stop = threading.Event()
    part = mmcore.finetune(offline_kit, shapes, tmp_path / "part", stop_event=stop,
                           progress=lambda row: row["step"] == 4 and stop.set(), **kw)
    assert part.stopped and len(part.history) == 4 and "request" in part.reason
    rest = mmcore.finetune(offline_kit, shapes, tmp_path / "part", resume="require", **kw)
    assert rest.resumed_from == 4 and not rest.stopped
    assert [r["loss"] for r in rest.history] == [r["loss"] for r in full.history]
    # AdamW's moments (twice the trained weights) are kept only while a run can resume
    stopped = mmcore.finetune(offline_kit, shapes, tmp_path / "kept", stop_event=stop, **kw)
    assert stopped.stopped and (tmp_path / "kept" / "optimizer.safetensors").is_file()
    for done in ("full", "part"):
        assert not list((tmp_path / done).glob("optimizer.*")), done
    again = mmcore.finetune(offline_kit, shapes, tmp_path / "full", **kw)    # nothing left
    assert again.resumed_from == again.history[-1]["steps"] and not again.stopped
    assert again.history == full.history
    for name, value in head(tmp_path / "full").items():
        torch.testing.assert_close(head(tmp_path / "part")[name], value, rtol=0, atol=1e-6)


def test_a_changed_run_never_resumes_silently(offline_kit, shapes, tmp_path):
    out = tmp_path / "ck"
    first = mmcore.finetune(offline_kit, shapes, out, epochs=1, batch_size=16, lr=1e-3)
    with pytest.raises(mmcore.InputError, match="different lr"):
        mmcore.finetune(offline_kit, shapes, out, epochs=1, batch_size=16, lr=3e-3)
    other = demo_data.make(tmp_path / "other", photos=False)
    (other / "captions.csv").write_text((other / "captions.csv").read_text().replace(
        "small", "tiny"))
    with pytest.raises(mmcore.InputError, match="different data"):
        mmcore.finetune(offline_kit, other, out, epochs=1, batch_size=16, lr=1e-3)
    fresh = mmcore.finetune(offline_kit, shapes, out, epochs=1, batch_size=16, lr=3e-3,
                            resume="never")
    assert fresh.resumed_from == 0 and fresh.history != first.history
    import json

    assert json.loads((out / "training.json").read_text())["options"]["lr"] == 3e-3
    same = mmcore.finetune(offline_kit, shapes, out, epochs=1, batch_size=16, lr=3e-3)
    assert same.resumed_from == same.history[-1]["steps"] and same.history == fresh.history
    with pytest.raises(mmcore.InputError, match="no checkpoint"):
        mmcore.finetune(offline_kit, shapes, tmp_path / "new", resume="require")


def test_finetune_never_reseeds_the_global_rng(tiny_kit, shapes, tmp_path, monkeypatch):
    def reseeded(*_):
        raise AssertionError("the global RNG was reseeded")

    monkeypatch.setattr(torch, "manual_seed", reseeded)
    monkeypatch.setattr(torch.random, "manual_seed", reseeded)
    monkeypatch.setattr(torch, "seed", reseeded)
    a = mmcore.finetune(tiny_kit, shapes, tmp_path / "a", epochs=1, batch_size=16,
                        train="text", seed=3)
    b = mmcore.finetune(tiny_kit, shapes, tmp_path / "b", epochs=1, batch_size=16,
                        train="text", seed=3)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]


@pytest.mark.parametrize("option, value, message", [
    ("weight_decay", float("nan"), "weight_decay must be a finite number"),
    ("weight_decay", float("inf"), "weight_decay must be a finite number"),
    ("weight_decay", 1e308, r"weight_decay must be in \[0, 1\]"),
    ("weight_decay", -1, r"weight_decay must be in \[0, 1\]"),
    ("lr", float("nan"), "lr must be a finite number"),
    ("lr", 0, r"lr must be in \(0, 1\]"),
    ("lr", "1e400", "lr must be a finite number"),
    ("warmup", 1.0, r"warmup must be in \[0, 1\)"),
    ("warmup", -0.1, r"warmup must be in \[0, 1\)"),
    ("val_fraction", 1.0, r"val_fraction must be in \[0, 0.9\]"),
    ("seed", "inf", "seed must be a finite number"),
    ("seed", float("nan"), "seed must be a finite number"),
    ("seed", 1.5, "seed must be a whole number"),
    ("epochs", 0, "epochs must be a whole number between 1 and 1000"),
    ("epochs", 2.5, "epochs must be a whole number"),
    ("batch_size", True, "batch_size must be a number"),
    ("accum_steps", None, "accum_steps must be a number"),
    ("train", "everything", "train must be one of"),
    ("colour", "red", "Unknown training option"),
])
def test_every_training_option_is_checked(tiny_kit, shapes, tmp_path, option, value, message):
    with pytest.raises(mmcore.InputError, match=message):
        mmcore.finetune(tiny_kit, shapes, tmp_path / "x",
                        **{"epochs": 1, "batch_size": 16, option: value})
    assert not (tmp_path / "x").exists()


def poison_from(monkeypatch, bad_step: int):
    """Make every step's loss NaN from `bad_step` on (options cannot, they are checked)."""
    real, calls = train.step_loss, []

    def step_loss(model, batch, accum, backward):
        calls.append(1)
        if len(calls) >= bad_step:
            batch = {**batch, "img_feats": batch["img_feats"] * float("nan")}
        return real(model, batch, accum, backward)

    monkeypatch.setattr(train, "step_loss", step_loss)


def test_a_non_finite_loss_stops_and_keeps_the_last_finite_checkpoint(
        offline_kit, shapes, tmp_path, monkeypatch):
    import threading

    stop = threading.Event()                     # the same run, stopped cleanly at step 3
    clean = mmcore.finetune(offline_kit, shapes, tmp_path / "clean", epochs=3, batch_size=16,
                            stop_event=stop, progress=lambda r: r["step"] == 3 and stop.set())
    poison_from(monkeypatch, 5)                  # 3 steps an epoch: checkpoint at step 3
    result = mmcore.finetune(offline_kit, shapes, tmp_path / "nan", epochs=3, batch_size=16)
    assert result.stopped and "non-finite" in result.reason and "step 5" in result.reason
    assert "kept the last finite checkpoint (step 3)" in result.reason
    assert [r["step"] for r in result.history] == [1, 2, 3, 4]
    assert result.checkpoint == tmp_path / "nan"
    for name, value in head(tmp_path / "nan").items():
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value, head(tmp_path / "clean")[name], rtol=0, atol=0)
    assert result.after == clean.after                  # measured on the kept weights


def test_a_run_that_is_never_finite_publishes_nothing(tiny_kit, shapes, tmp_path, monkeypatch):
    poison_from(monkeypatch, 1)
    result = mmcore.finetune(tiny_kit, shapes, tmp_path / "nan", epochs=2, batch_size=16)
    assert result.checkpoint is None and result.stopped and not result.after
    assert "no finite checkpoint" in result.reason
    assert not (tmp_path / "nan").exists()


def test_two_processes_train_as_one_on_the_combined_batch(tiny_kit, shapes, tmp_path):
    """`python -m mmcore.train` under torchrun (2 CPU processes, gloo, DDP through accelerate)
    with 8 pairs per process ends with the weights and losses of one process with 16; data
    smaller than one global batch (5 pairs for 2 x 8) still trains (equal shards)."""
    import json

    from safetensors.torch import load_file

    small = tmp_path / "small"
    small.mkdir()
    lines = (shapes / "captions.csv").read_text().splitlines()
    (small / "captions.csv").write_text("\n".join(lines[:6]) + "\n")
    for line in lines[1:6]:
        name = line.split(",")[0]
        (small / name).write_bytes((shapes / name).read_bytes())
    script = tmp_path / "run.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from mmcore import train
common = ["--kit", "tiny", "--train", "text", "--lr", "1e-3", "--workers", "0", "--epochs", "1"]
assert train.main([{str(shapes)!r}, "--out", {str(tmp_path / "two")!r}, "--batch-size", "8",
                   *common]) == 0
assert train.main([{str(small)!r}, "--out", {str(tmp_path / "tiny")!r}, "--batch-size", "8",
                   "--val-fraction", "0", *common]) == 0
sys.stdout.flush()
os._exit(0)     # as in the test above: gloo's destructors sometimes abort at exit
""")
    env = {**os.environ, "MMCORE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(script)], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    one = mmcore.finetune(tiny_kit, shapes, tmp_path / "one", epochs=1, batch_size=16,
                          train="text", lr=1e-3, workers=0)
    two = json.loads((tmp_path / "two" / "training.json").read_text())["history"]
    assert len(two) == len(one.history) == len(shapes_pairs(shapes)) // 16
    for a, b in zip(one.history, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    mine, theirs = (load_file(str(tmp_path / k / "model.safetensors")) for k in ("one", "two"))
    assert mine.keys() == theirs.keys()
    for name, value in mine.items():
        if name.endswith("k_proj.bias"):
            # softmax ignores a shift shared by all keys: this bias's true gradient is 0, and
            # AdamW turns its float noise (different in each summation order) into lr steps
            continue
        torch.testing.assert_close(theirs[name], value, rtol=1e-4, atol=1e-5)
    small_run = json.loads((tmp_path / "tiny" / "training.json").read_text())["history"]
    assert len(small_run) == 1 and math.isfinite(small_run[0]["loss"])


def test_images_decoded_by_loader_workers_train_as_in_process(tiny_kit, shapes, tmp_path):
    kw = dict(epochs=1, batch_size=16, train="image", lr=1e-3)
    here = mmcore.finetune(tiny_kit, shapes, tmp_path / "here", workers=0, **kw)
    there = mmcore.finetune(tiny_kit, shapes, tmp_path / "there", workers=2, **kw)
    assert [r["loss"] for r in there.history] == [r["loss"] for r in here.history]


def test_cli_runs_under_accelerate_launch(tmp_path, shapes):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMCORE_DEVICE": "cpu"}
    launcher = Path(sys.executable).with_name("accelerate")
    out = subprocess.run([str(launcher), "launch", "--cpu", "--num_processes", "1",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                          "no", "-m", "mmcore.train", str(shapes), "--out", str(tmp_path / "ck"),
                          "--kit", "tiny", "--epochs", "1", "--batch-size", "16"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "after" in out.stdout and (tmp_path / "ck" / "model.safetensors").exists()


def test_accumulation_with_a_trained_tower_equals_the_full_batch(tiny_kit, shapes, tmp_path):
    """Micro-batches recompute the tower with gradients against the cached rest (open_clip):
    the run's losses equal the full batch's step for step."""
    kw = dict(epochs=1, batch_size=16, train="text", lr=1e-3)
    full = mmcore.finetune(tiny_kit, shapes, tmp_path / "full", accum_steps=1, **kw)
    accum = mmcore.finetune(tiny_kit, shapes, tmp_path / "accum", accum_steps=4, **kw)
    assert len(accum.history) == len(full.history) > 1
    for a, b in zip(full.history, accum.history):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)


def test_towers_run_under_autocast_where_the_device_has_it(tiny_kit, shapes, tmp_path,
                                                           monkeypatch):
    """Mixed precision wraps the whole forward, towers included (here bf16 on the CPU, as a
    stand-in for a GPU: accelerate autocasts the same way on both)."""
    from accelerate.state import AcceleratorState

    from mmcore.tiny import SIZES

    seen = set()

    def hook(module, args, output):            # the tower's layers, not the projections
        if isinstance(module, torch.nn.Linear) and torch.is_grad_enabled() and \
                module.out_features != SIZES.projection:
            seen.add(output.dtype)

    AcceleratorState._reset_state(True)
    monkeypatch.setattr(train, "mixed_precision", lambda device: "bf16")
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        result = mmcore.finetune(tiny_kit, shapes, tmp_path / "bf16", epochs=1, batch_size=16,
                                 train="text")
    finally:
        handle.remove()
        AcceleratorState._reset_state(True)
    assert torch.bfloat16 in seen and result.checkpoint is not None
    assert all(math.isfinite(r["loss"]) for r in result.history)


@pytest.mark.parametrize("n_pairs", [2, 3, 5, 17, 58])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_gets_equal_shards_that_make_the_one_process_batch(n_pairs, world):
    """all_gather needs shards of one size, also with fewer pairs than one global batch; the
    ranks' k-th batches together are one process's k-th batch of world x the size."""
    from mmcore.train_batches import epoch_batches

    if n_pairs < world:
        with pytest.raises(mmcore.InputError, match="cannot be shared"):
            epoch_batches(n_pairs, 8, 0, 0, 0, world)
        return
    ranks = [epoch_batches(n_pairs, 8, 1, 7, r, world) for r in range(world)]
    one = epoch_batches(n_pairs, 8 * world, 1, 7, 0, 1)
    assert len({len(r) for r in ranks}) == 1
    for k, batches in enumerate(zip(*ranks)):
        assert len({len(b) for b in batches}) == 1 and len(batches[0]) >= 1
        combined = sorted(i for b in batches for i in b)
        assert len(set(combined)) == len(combined)
        if n_pairs % world == 0:                 # else the ranks leave the remainder out
            assert combined == sorted(one[k])
