"""Deployment: the app starts the way a Hugging Face Space starts it, the README's front
matter is a working Space configuration, the wheel installs and imports anywhere, and GPU
work is wrapped for ZeroGPU where the `spaces` package is present."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import pytest
import torch

import app as app_module
from mmcore import device

ROOT = Path(__file__).resolve().parent.parent
SPACE_ENV = {"SPACE_ID": "someone/mmcore", "SYSTEM": "spaces", "GRADIO_SERVER_NAME": "0.0.0.0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SPACE", "GRADIO_SERVER", "MMCORE_KIT", "MMCORE_HOST"))
           and k not in ("SYSTEM", "PORT")}
    env.update(extra)
    return env


# ------------------------------------------------------------------ defaults on and off a Space

def test_defaults_follow_the_space(monkeypatch):
    for key in ("SPACE_ID", "MMCORE_KIT", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "PORT",
                "MMCORE_HOST"):
        monkeypatch.delenv(key, raising=False)
    off = app_module.parse_args([])
    assert (off.kit, off.host, off.port) == ("offline", "127.0.0.1", 7860)
    monkeypatch.setenv("SPACE_ID", "someone/mmcore")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    on = app_module.parse_args([])
    assert (on.kit, on.host, on.port) == ("hub", "0.0.0.0", 7861)
    monkeypatch.setenv("MMCORE_KIT", "tiny")                  # the Space's variable wins
    assert app_module.parse_args([]).kit == "tiny"
    flags = app_module.parse_args(["--kit", "offline", "--host", "127.0.0.1", "--port", "9"])
    assert (flags.kit, flags.host, flags.port) == ("offline", "127.0.0.1", 9)   # flags win


def test_persistent_storage_only_on_a_space_with_a_writable_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert app_module.space_storage(str(tmp_path)) is None
    monkeypatch.setenv("SPACE_ID", "someone/mmcore")
    assert app_module.space_storage(str(tmp_path)) == str(tmp_path)
    assert app_module.space_storage(str(tmp_path / "absent")) is None


def test_app_starts_like_a_space_and_serves_on_all_interfaces(tmp_path):
    import psutil
    from gradio_client import Client

    port = free_port()
    scratch = tmp_path / "tmp"             # the system temp folder, as this app sees it
    scratch.mkdir()
    env = clean_env(**SPACE_ENV, GRADIO_SERVER_PORT=str(port), MMCORE_KIT="tiny",
                    TMPDIR=str(scratch))
    env.pop("GRADIO_TEMP_DIR", None)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() - start < 180, "the app did not serve within 180 s"
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        listening = {(c.laddr.ip, c.laddr.port) for c in
                     psutil.Process(proc.pid).net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert ("0.0.0.0", port) in listening, listening
        info = Client(url, verbose=False).predict(api_name="/kit_info")
        print(f"first answer {time.monotonic() - start:.1f} s after start")
        assert info["kit"] == "tiny"
        models = httpx.get(f"{url}v1/models", timeout=10).json()      # mounted beside it
        assert models["data"][0]["id"] == "tiny random GPT-2"
        made = sorted(p.name for p in scratch.iterdir())
        assert any(n.startswith("mmcore-gradio-") for n in made), made
        assert any(n.startswith("mmcore-app-") for n in made), made
        # a host stops a Space (docker stop, a restart) with SIGTERM: the app exits cleanly
        # and takes its temp folders (uploads, demo photos: megabytes a start) with it
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out[-3000:]
        # (on this fake Space Gradio's reload watcher fails at start for want of the `spaces`
        # package, which real Spaces have; the shutdown must be clean)
        assert "Traceback" not in out.partition("closing server")[2], out[-3000:]
        left = sorted(p.name for p in scratch.iterdir() if p.name.startswith("mmcore-"))
        assert left == [], left
    finally:
        if proc.poll() is None:
            proc.kill()


def test_hub_kit_on_a_space_without_network_says_what_to_do(tmp_path):
    env = clean_env(**SPACE_ENV, GRADIO_SERVER_PORT=str(free_port()),
                    HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "preload_from_hub" in proc.stderr and "--kit offline" not in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the Space configuration

def front_matter() -> dict:
    import yaml

    text = (ROOT / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with the Space's front matter"
    return yaml.safe_load(match.group(1))


def test_front_matter_is_a_working_space_configuration():
    import gradio

    from mmcore import kits

    meta = front_matter()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["sdk_version"] == gradio.__version__              # what requirements pin
    major, minor = map(int, str(meta["python_version"]).split(".")[:2])
    assert (major, minor) >= (3, 11)                              # transformers 5 needs 3.11
    assert meta["suggested_hardware"] and meta["short_description"]
    assert len(meta["short_description"]) <= 60                   # the hub's limit
    assert re.fullmatch(r"\d+[mh]", str(meta["startup_duration_timeout"]))
    hub_models = {spec.source for spec in kits._hub_specs().values()}
    preloaded = {entry.split()[0] for entry in meta["preload_from_hub"]}
    assert hub_models <= preloaded and hub_models <= set(meta["models"])
    pins = (ROOT / "requirements.txt").read_text()
    assert f"gradio=={gradio.__version__}" in pins


# ------------------------------------------------------------------ the package

def test_wheel_installs_and_imports_from_a_clean_folder(tmp_path):
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked + ["pyproject.toml"]:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", str(src), "-w", str(tmp_path / "dist")],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("mmcore_workbench-*.whl"))
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 1024:.0f} KiB")
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                              "--target", str(site), str(wheel)], capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    clean = tmp_path / "elsewhere"
    clean.mkdir()
    probe = ("import mmcore, demos, app; from mmcore import nsp; "
             "print(mmcore.__file__); print(nsp.CALIBRATION.is_file(), nsp.PAIRS.is_file())")
    env = {**clean_env(), "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=clean, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    path, data = out.stdout.split("\n")[:2]
    assert Path(path).is_relative_to(site) and data == "True True"
    entry_points = next(site.glob("mmcore_workbench-*.dist-info")) / "entry_points.txt"
    scripts = entry_points.read_text()
    for name in ("mmcore-app = app:main", "mmcore-index = mmcore.index:main",
                 "mmcore-train = mmcore.train:main"):
        assert name in scripts


# ------------------------------------------------------------------ GPU and ZeroGPU

def test_gpu_task_uses_spaces_gpu_when_the_package_is_there(monkeypatch):
    def work(x):
        return x + 1

    monkeypatch.setitem(sys.modules, "spaces", None)          # not installed
    assert device.gpu_task(60)(work) is work
    calls = []

    def fake_gpu(duration=None):
        def decorate(fn):
            calls.append((fn, duration))
            return lambda *a, **k: ("on gpu", fn(*a, **k))
        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=fake_gpu))
    wrapped = device.gpu_task(90)(work)
    assert calls == [(work, 90)] and wrapped(1) == ("on gpu", 2)


def test_autocast_dtype_follows_the_gpu(monkeypatch):
    assert device.autocast_dtype(torch.device("cpu")) is None
    assert device.mixed_precision(torch.device("cpu")) == "no"
    with device.autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.autocast_dtype(torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)   # a T4
    assert device.autocast_dtype(torch.device("cuda")) is torch.float16
    assert device.mixed_precision(torch.device("cuda")) == "fp16"
    assert device.grad_scaler(torch.device("cpu")).is_enabled() is False


def test_model_events_run_under_spaces_gpu_sized_to_their_lane(monkeypatch):
    import functools
    import inspect

    from gradio_client import Client

    from demos import GPU_SECONDS, launch_kwargs

    wrapped = {}

    def fake_gpu(duration=None):
        def decorate(fn):
            if inspect.isgeneratorfunction(fn):
                @functools.wraps(fn)
                def gen(*a, **k):
                    wrapped[fn.__name__]["calls"] += 1
                    yield from fn(*a, **k)
                out = gen
            else:
                @functools.wraps(fn)
                def out(*a, **k):
                    wrapped[fn.__name__]["calls"] += 1
                    return fn(*a, **k)
            wrapped[fn.__name__] = {"duration": duration, "calls": 0}
            return out
        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=fake_gpu))
    demo, ctx = app_module.create(app_module.parse_args(["--kit", "tiny"]))
    for name in ("generate", "fill_mask", "next_sentence", "zero_shot", "search",
                 "show_attention", "load_demo", "fill_mask_batch"):
        assert name in wrapped, (name, sorted(wrapped))
    assert wrapped["generate"]["duration"] == GPU_SECONDS["generate"]
    assert wrapped["fill_mask"]["duration"] == GPU_SECONDS["short"]
    assert wrapped["fill_mask_batch"]["duration"] == GPU_SECONDS["long"]
    assert "kit_info" not in wrapped and "validate" not in wrapped      # no model, no GPU
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True,
                            **launch_kwargs(ctx, "127.0.0.1", None, False))
    try:
        Client(url, verbose=False).predict("The capital of France is [MASK].", 3, "",
                                           api_name="/fill_mask")
        assert wrapped["fill_mask"]["calls"] == 1          # the request went through it
    finally:
        demo.close()
        ctx.kit.stop_serving()
