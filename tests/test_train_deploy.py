"""Fine-tuning where it is deployed: ZeroGPU runs in time-limited chunks that end exactly where
one run ends, running out of GPU memory is a clear message and the next run works, a Space
without persistent storage says what a restart loses, and the training tab's answers for a
bad seed and for a run that saved nothing."""

import functools
import inspect
import sys
import types

import pytest
import torch
from gradio_client import Client
from safetensors.torch import load_file

import app as app_module
import mmcore
from mmcore import datadir, demo_data, train

KW = dict(epochs=2, batch_size=16, lr=1e-3, seed=0, train="text")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return demo_data.make(tmp_path_factory.mktemp("shapes"), photos=False)


def weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a, b) -> None:
    for name, value in weights(a).items():
        if name.endswith("k_proj.bias"):
            # softmax ignores a shift shared by all keys: this bias's true gradient is 0, and
            # AdamW turns its float noise (another summation order when the run is in another
            # thread, as the app's is) into lr-sized steps
            continue
        torch.testing.assert_close(weights(b)[name], value, rtol=1e-4, atol=1e-5)


def test_a_run_in_chunks_ends_with_the_weights_of_one_run(tiny_kit, shapes, tmp_path):
    whole = mmcore.finetune(tiny_kit, shapes, tmp_path / "whole", **KW)
    calls = []

    def chunk(resume):
        calls.append(resume)
        return mmcore.finetune(tiny_kit, shapes, tmp_path / "chunked", resume=resume,
                               time_budget=0, **KW)      # one step per call

    results = list(train.chunks(chunk))
    steps = len(whole.history)
    assert len(results) == steps and calls == ["auto"] + ["require"] * (steps - 1)
    assert all(r.reason == train.PAUSED for r in results[:-1]) and not results[-1].stopped
    assert [r["loss"] for r in results[-1].history] == [r["loss"] for r in whole.history]
    assert_same_weights(tmp_path / "whole", tmp_path / "chunked")


def test_out_of_gpu_memory_is_a_clear_message_and_the_next_run_works(
        tiny_kit, shapes, tmp_path, monkeypatch):
    real = train.step_loss

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "step_loss", oom)
    with pytest.raises(mmcore.InputError, match="ran out of memory.*smaller batch size"):
        mmcore.finetune(tiny_kit, shapes, tmp_path / "a", **KW)
    monkeypatch.setattr(train, "step_loss", real)
    assert mmcore.finetune(tiny_kit, shapes, tmp_path / "b", **KW).checkpoint is not None


def test_lost_on_restart_only_on_a_space_off_its_persistent_storage(tmp_path, monkeypatch):
    storage = tmp_path / "data"
    storage.mkdir()
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert not datadir.lost_on_restart(tmp_path / "elsewhere", storage)
    monkeypatch.setenv("SPACE_ID", "someone/mmcore")
    assert datadir.lost_on_restart(tmp_path / "elsewhere", storage)
    assert not datadir.lost_on_restart(storage / "mmcore", storage)
    assert datadir.lost_on_restart(storage / "mmcore", tmp_path / "no-such-storage")


def notices(demo) -> int:
    return sum("no persistent storage" in str(c.get("props", {}).get("value", ""))
               for c in demo.config["components"])


def test_the_training_and_retrieval_tabs_say_what_a_restart_loses(tiny_kit, tmp_path,
                                                                   monkeypatch):
    args = ["--kit", "tiny", "--data-dir", str(tmp_path / "d")]
    monkeypatch.delenv("SPACE_ID", raising=False)
    demo, _ = app_module.create(app_module.parse_args(args))
    assert notices(demo) == 0
    monkeypatch.setenv("SPACE_ID", "someone/mmcore")        # and no /data mounted here
    demo, _ = app_module.create(app_module.parse_args(args))
    assert notices(demo) == 2


def serve(tmp_path):
    from demos import launch_kwargs

    demo, ctx = app_module.create(app_module.parse_args(
        ["--kit", "tiny", "--data-dir", str(tmp_path / "data")]))
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True,
                            **launch_kwargs(ctx, "127.0.0.1", None, False))
    return demo, ctx, Client(url, verbose=False)


ARGS = [None, True, 2, 16, 1e-3, 0.05, 0.1, "text", 1]       # ... then the seed


def test_zero_gpu_trains_in_gpu_calls_that_add_up_to_one_run(tiny_kit, shapes, tmp_path,
                                                              monkeypatch):
    import demos.train as tab

    calls = {}

    def fake_gpu(duration=None):
        def decorate(fn):
            if inspect.isgeneratorfunction(fn):              # the other tabs' events
                return fn

            @functools.wraps(fn)
            def on_gpu(*a, **k):
                calls.setdefault(fn.__name__, []).append(duration)
                return fn(*a, **k)
            return on_gpu
        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=fake_gpu))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(tab, "CHUNK_SECONDS", 0)              # one step per GPU call
    demo, ctx, client = serve(tmp_path)
    try:
        status, _, _, compare, download = client.predict(*ARGS, 0, api_name="/train")
        assert "finished" in status and download and compare["data"]
        assert ctx.training.thread is None                    # no background thread
        name, folder = next(iter(ctx.checkpoints.items()))
        whole = mmcore.finetune(tiny_kit, ctx.work_dir / "demo-set", tmp_path / "whole",
                                **ctx.data.load(name).options)
        assert calls["train_chunk"] == [tab.GPU_SECONDS] * len(whole.history)
        assert_same_weights(tmp_path / "whole", type(tmp_path)(folder))
    finally:
        demo.close()


def test_a_bad_seed_is_a_message_and_a_run_that_saved_nothing_is_no_model(
        tiny_kit, tmp_path, monkeypatch):
    demo, ctx, client = serve(tmp_path)
    try:
        for seed in ("inf", "nan", "1e400"):
            with pytest.raises(Exception, match="Seed must be a finite number"):
                client.predict(*ARGS, seed, api_name="/train")
        real = train.step_loss

        def nan(model, batch, accum, backward):
            return real(model, {**batch, "img_feats": batch["img_feats"] * float("nan")},
                        accum, backward)

        monkeypatch.setattr(train, "step_loss", nan)
        status, _, _, _, download = client.predict(*ARGS, 0, api_name="/train")
        assert "before any model was saved" in status and "non-finite" in status
        assert not download and not ctx.checkpoints
    finally:
        demo.close()
