"""Driving a running app the way a hostile client would: raw queue calls (any payload, any
session hash, event data a browser would send), direct REST posts, and what lies on disk."""

import contextlib
import json
import os
import re
import time
import uuid
from pathlib import Path

import httpx

import app as app_module
from demos import launch_kwargs

FILE = {"_type": "gradio.FileData"}
UPLOAD_DIR = re.compile(r"^[0-9a-f]{64}$")      # gradio's content-addressed upload folders


def launch(argv):
    """(demo, ctx, url) of the app built from `argv`, served in this process."""
    demo, ctx = app_module.create(app_module.parse_args(argv))
    ctx.start_warming()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True,
                            **launch_kwargs(ctx, "127.0.0.1", None, False))
    return demo, ctx, url


@contextlib.contextmanager
def served_client(argv=("--kit", "tiny", "--no-warm")):
    """(ctx, gradio_client.Client) of the app built from `argv`, served in this process;
    both closed after the block."""
    from gradio_client import Client

    demo, ctx, url = launch(list(argv))
    client = Client(url, verbose=False)
    try:
        yield ctx, client
    finally:
        client.close()
        demo.close()


def config(url) -> dict:
    return httpx.get(f"{url}config", timeout=30).json()


def fn_index(url, api_name: str) -> int:
    for dep in config(url)["dependencies"]:
        if dep.get("api_name") == api_name:
            return dep["id"]
    raise KeyError(api_name)


def file_data(path, name=None) -> dict:
    """A FileData payload naming any path, as a hostile client may send it."""
    return {"path": str(path), "orig_name": name or Path(str(path)).name, "meta": FILE}


class QueueResult:
    def __init__(self, messages):
        self.messages = messages
        last = messages[-1] if messages else {}
        self.success = bool(last.get("success"))
        output = last.get("output") or {}
        self.error = output.get("error") or ""
        self.data = output.get("data")

    def __repr__(self):
        return f"QueueResult(success={self.success}, error={self.error!r}, data={self.data!r})"


def queue_call(url, fn, data, session=None, event_data=None, timeout=120) -> QueueResult:
    """Join the queue with a raw payload (NaN allowed) and read the event to its end."""
    session = session or uuid.uuid4().hex
    index = fn if isinstance(fn, int) else fn_index(url, fn)
    body = json.dumps({"data": data, "fn_index": index, "session_hash": session,
                       "event_data": event_data, "trigger_id": None})   # NaN stays NaN
    with httpx.Client(timeout=timeout) as http:
        joined = http.post(f"{url}gradio_api/queue/join", content=body,
                           headers={"content-type": "application/json"})
        assert joined.status_code == 200, joined.text
        event_id = joined.json()["event_id"]
        messages = []
        deadline = time.monotonic() + timeout
        with http.stream("GET", f"{url}gradio_api/queue/data",
                         params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn} did not finish in {timeout} s")
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") not in (None, event_id):
                    continue
                messages.append(msg)
                if msg.get("msg") == "process_completed":
                    break
    return QueueResult(messages)


def own_files(root) -> set:
    """Files under the app's temp folder that are not users' uploads (gradio keeps those in
    content-addressed folders and deletes them on its `delete_cache` schedule)."""
    root = Path(root)
    out = set()
    for dirpath, _, names in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts and UPLOAD_DIR.match(rel.parts[0]):
            continue
        out.update(str(rel / n) for n in names)
    return out


def wait_until(predicate, timeout=15.0, step=0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def tuned_clip(folder, seed: int = 0):
    """A copy of the tiny CLIP at `folder` with its projections moved: a "fine-tuned" dual
    encoder whose answers differ from the base model's."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mmcore import tiny

    shutil.copytree(tiny.folder("clip"), folder)
    weights = next(Path(folder).glob("*.safetensors"))
    state = load_file(str(weights))
    g = torch.Generator().manual_seed(seed)
    for key in state:
        if "projection" in key:
            state[key] = state[key] + 0.5 * torch.randn(state[key].shape, generator=g)
    save_file(state, str(weights), metadata={"format": "pt"})
    return Path(folder)


def perturbed_copy(kind: str, folder, noise: float = 0.1, seed: int = 0,
                   model_class: str = "AutoModelForCausalLM") -> Path:
    """A copy of the tiny kit's `kind` ("gpt2", "bert") at `folder` with seeded noise on every
    weight: a user's own checkpoint whose answers differ from the kit's."""
    import shutil

    import torch
    import transformers

    from mmcore import tiny

    shutil.copytree(tiny.folder(kind), folder)
    model = getattr(transformers, model_class).from_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    model.save_pretrained(folder)
    return Path(folder)
