"""Memory and disk soak: 1,000 mixed requests against the running app (a server process of
its own), from user sessions that come and go, then every session ends. Reports the server's
resident memory and its temp folder (bytes and files: mmcore's own, and Gradio's copies of
uploads and outputs) at start, after warm-up, after the requests, after the sessions end and
after Gradio's own cache expiry.

RSS is read at once and "settled": 35 s later, after the server's housekeeping (every 30 s)
has handed freed heap memory back to the OS (glibc keeps it otherwise, which looks like a
leak but is not one).

Targets: RSS growth under 50 MB per 1,000 requests after warm-up; the temp folder back to its
start size once the sessions have ended (and Gradio's `--cache-ttl` has passed for its
copies of uploads).

    .venv/bin/python bench/bench_soak.py [--kit offline|tiny] [--requests 1000]
"""

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPLOAD = set("0123456789abcdef")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_stats(root: Path) -> dict:
    """Bytes and files under the server's temp folder: mmcore's own, and Gradio's."""
    out = {"own_bytes": 0, "own_files": 0, "gradio_bytes": 0, "gradio_files": 0}
    for dirpath, _, names in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        kind = "gradio" if rel and len(rel[0]) == 64 and set(rel[0]) <= UPLOAD else "own"
        for n in names:
            try:
                out[f"{kind}_bytes"] += os.lstat(os.path.join(dirpath, n)).st_size
                out[f"{kind}_files"] += 1
            except OSError:
                pass
    return out


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def settled_rss_mb(pid: int, wait: float = 35.0) -> float:
    """RSS once the server's housekeeping (every 30 s) has handed freed memory back."""
    time.sleep(wait)
    return rss_mb(pid)


def fixtures(folder: Path) -> dict:
    """Small inputs of every kind the requests upload."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photo = folder / "cat.png"
    Image.fromarray(data.chelsea()).resize((160, 120)).save(photo)
    other = folder / "coffee.png"
    Image.fromarray(data.coffee()).resize((160, 120)).save(other)
    csv = folder / "sentences.csv"
    csv.write_text("sentence\nthe cat sat on the [MASK].\nI drink [MASK] every day.\n")
    gallery = folder / "gallery.zip"
    with zipfile.ZipFile(gallery, "w") as zf:
        for name in ("rocket", "astronaut"):
            buf = io.BytesIO()
            Image.fromarray(getattr(data, name)()).resize((120, 120)).save(buf, "PNG")
            zf.writestr(f"{name}.png", buf.getvalue())
    return {"photo": photo, "other": other, "csv": csv, "gallery": gallery}


def requests_for(files: dict) -> list:
    """(api name, argument maker) in the mix sent round-robin (short work most often)."""
    from gradio_client import handle_file

    photo, other = handle_file(str(files["photo"])), handle_file(str(files["other"]))
    return [
        ("/fill_mask", lambda: ("The capital of France is [MASK].", 5, "")),
        ("/next_sentence", lambda: ("It rained all day.", "The streets were wet.")),
        ("/zero_shot", lambda: (photo, "a cat, a dog, a car", "a photo of {}.", False,
                                "softmax", 0, "base model")),
        ("/search", lambda: ("a cat", None, "", 4)),
        ("/generate", lambda: ("Once upon a time", 8, 0, 0, 1, 1, "1", "", "auto")),
        ("/fill_mask", lambda: ("I drink a cup of [MASK].", 3, "")),
        ("/attention", None),                                   # filled in below
        ("/zero_shot_batch", lambda: ([photo, other], "a cat, a cup", "a photo of {}.",
                                      False, "softmax")),
        ("/search", lambda: ("a rocket", None, "a cat", 3)),
        ("/fill_mask_batch", lambda: (handle_file(str(files["csv"])), 3)),
        ("/add_images", lambda: ([handle_file(str(files["gallery"]))], "base model")),
        ("/save_index", lambda: ()),
        ("/export_embeddings", lambda: ("csv",)),
        ("/validate_training_data", lambda: (None, True)),
        ("/worked_example", lambda: ("the cat sat on the mat",)),
        ("/kit_info", lambda: ()),
    ]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kit", default="offline", choices=["offline", "tiny"])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--session-length", type=int, default=40, help="requests per user session")
    p.add_argument("--cache-ttl", type=int, default=60,
                   help="the server's --cache-ttl; the soak waits that long for Gradio's sweep")
    args = p.parse_args()
    from gradio_client import Client

    work = Path(tempfile.mkdtemp(prefix="mmcore-soak-"))
    server_temp = work / "server-temp"
    server_temp.mkdir()
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(server_temp), "MMCORE_DATA_DIR": str(work / "data"),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--kit", args.kit,
                               "--port", str(port), "--cache-ttl", str(args.cache_ttl)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    # the clients' own downloads go elsewhere, not into the server's folder
    os.environ["GRADIO_TEMP_DIR"] = str(work / "client-temp")
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                Client(url, verbose=False).close()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        files = fixtures(work / "inputs")
        mix = requests_for(files)
        first = Client(url, verbose=False)
        attention_model = first.view_api(return_format="dict", print_info=False)[
            "named_endpoints"]["/attention"]["parameters"][1]["parameter_default"]
        first.close()
        mix = [(api, fn if fn else (lambda: ("the cat sat on the mat", attention_model, 1, 0)))
               for api, fn in mix]
        rows = [("start", rss_mb(server.pid), rss_mb(server.pid), folder_stats(server_temp))]
        print(f"soak: kit {args.kit}, {args.warmup} warm-up + {args.requests} requests, "
              f"sessions of {args.session_length} requests, server pid {server.pid}")
        errors, client, done, started = {}, None, 0, time.perf_counter()
        total = args.warmup + args.requests
        for n in range(total):
            if n % args.session_length == 0:
                if client is not None:
                    client.close()                   # this user session ends
                client = Client(url, verbose=False)
                client.predict("base model", api_name="/load_demo_gallery")
            api, make = mix[n % len(mix)]
            try:
                client.predict(*make(), api_name=api)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                key = f"{api}: {str(exc)[:80]}"
                errors[key] = errors.get(key, 0) + 1
            done += 1
            if done == args.warmup:
                raw = rss_mb(server.pid)
                rows.append(("after warm-up", raw, settled_rss_mb(server.pid),
                             folder_stats(server_temp)))
            if done % 100 == 0:
                print(f"  {done}/{total} requests, {time.perf_counter() - started:.0f} s, "
                      f"RSS {rss_mb(server.pid):.0f} MB", flush=True)
        raw = rss_mb(server.pid)
        rows.append((f"after {args.requests} requests", raw, settled_rss_mb(server.pid),
                     folder_stats(server_temp)))
        client.close()
        # a closed client drops its heartbeat within ~15 s; the unload event runs then
        raw = rss_mb(server.pid)
        rows.append(("after the sessions end", raw, settled_rss_mb(server.pid),
                     folder_stats(server_temp)))
        time.sleep(args.cache_ttl + min(600, max(60, args.cache_ttl)))
        rows.append(("after Gradio's cache expiry", rss_mb(server.pid), rss_mb(server.pid),
                     folder_stats(server_temp)))
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"\n{'moment':30} {'RSS MB':>7} {'settled':>8} {'own files':>10} {'own KB':>8} "
          f"{'gradio files':>13} {'gradio KB':>10}")
    for label, rss, settled, st in rows:
        print(f"{label:30} {rss:7.0f} {settled:8.0f} {st['own_files']:10d} "
              f"{st['own_bytes'] / 1024:8.0f} {st['gradio_files']:13d} "
              f"{st['gradio_bytes'] / 1024:10.0f}")
    print(f"\nRSS growth after warm-up, per {args.requests} requests: "
          f"{rows[2][1] - rows[1][1]:+.1f} MB at once, {rows[2][2] - rows[1][2]:+.1f} MB settled "
          f"(target < 50 MB)")
    print(f"temp folder after the sessions end: {rows[3][3]['own_files']} own files "
          f"({rows[3][3]['own_bytes']} bytes) vs {rows[0][3]['own_files']} at start; after "
          f"Gradio's expiry {rows[4][3]['gradio_files']} Gradio files "
          f"({rows[4][3]['gradio_bytes']} bytes) vs {rows[0][3]['gradio_files']} "
          f"({rows[0][3]['gradio_bytes']} bytes) at start")
    if errors:
        print("errors:", *(f"  {k} x{v}" for k, v in errors.items()), sep="\n")


if __name__ == "__main__":
    main()
