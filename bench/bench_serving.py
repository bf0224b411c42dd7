"""Many users at once, through the app: continuous batching on against today's one slot.

Starts the app twice on free ports (`--batching on` and `--batching off`, both on the same
kit), warms both (every model loaded and run, every client's session made), then for 1, 4,
8 and 16 concurrent `gradio_client` users generating 64 tokens each (plain continuation,
greedy; each level `--rounds` times, its median reported) drives each server in turn,
level by level, while one more client makes short calls (fill-mask and zero-shot,
alternately, one a second) until the generations end. Per server
and level it prints aggregate tokens/s, p50/p95 time to first token (seen by the client:
queueing included), p50/p95 latency of the short calls against their idle latency, and the
server's peak RSS.

The simulated users share this machine's cores with the server, so what they cost is kept
small: every client shares one TLS context (`ssl_verify=`, which gradio_client hands to
httpx): gradio_client opens a new `httpx` client for each call, and each one loaded the CA
bundle again (17.6 ms of CPU, measured). In an 8-user round with short calls, the
benchmark's process then used 0.58-0.68 s of CPU, 0.08 s with one context; the eight
requests reached the server's queue over 0.07-0.22 s, then 0.005-0.027 s; 191-249 tok/s,
then 274-283 (three rounds each, the earlier prompts). Every prompt runs its 64 tokens
without reaching EOS, so each user does the work one user alone does.

    .venv/bin/python bench/bench_serving.py [--tiny] [--users 1,4,8,16] [--tokens 64]
        [--rounds 3]
"""

import argparse
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Once upon a time, in a village by the mountains,",
           "The history of the printing press begins in the fifteenth century,",
           "Here is a short guide to growing tomatoes at home:",
           "The city council met on Tuesday to discuss",
           "In the deep ocean, far below the reach of sunlight,",
           "My grandmother always told me that",
           "The first thing you notice about the old lighthouse is",
           "Every morning, the baker on our street"]   # none ends (EOS) within 64 greedy tokens
FILL = "The capital of France is [MASK]."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, kit: str, batching: str, log_dir: Path):
        self.port = free_port()
        self.name = f"batching {batching}"
        self.log = open(log_dir / f"server-{batching}.log", "w")
        # compiled decode steps off in both: the one-slot server would otherwise compile in
        # the background during the first levels (this compares batching, not compiling)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MMCORE_COMPILE": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--kit", kit, "--port", str(self.port),
             "--batching", batching, "--no-warm"], cwd=ROOT, env=env,
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self, limit: float = 300) -> None:
        import httpx

        end = time.monotonic() + limit
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name}: the app exited; see {self.log.name}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name}: not up after {limit} s")

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


_TLS = ssl.create_default_context()      # made once: see the module docstring


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False, ssl_verify=_TLS)


def generate(c, prompt: str, tokens: int, every: float = 0.01) -> tuple:
    """(ttft seconds, tokens generated) of one streamed generation. The job's updates are
    read every `every` s (`job.outputs()`), not by iterating the job: gradio_client's
    iterator checks for a new update every millisecond, and eight iterating clients took
    ~0.3 of a core on the server's two; iterating also showed one user's first update
    0.8 s late in some rounds (polling: 0.08-0.13 s; 8 users 232-290 -> 252-304 tok/s)."""
    start = time.perf_counter()
    job = c.submit(prompt, tokens, 0, 0, 1, 1, "", "", "plain continuation",
                   api_name="/generate")
    first = None
    while not job.done():
        if first is None:
            outs = job.outputs()
            if outs and outs[-1] and outs[-1][0]:
                first = time.perf_counter() - start
        time.sleep(every)
    text, live, *_ = job.result()
    count = int(re.search(r"(\d+) tokens", live).group(1))
    return (first if first is not None else time.perf_counter() - start), count


def short_call(c, kind: str, image) -> float:
    start = time.perf_counter()
    if kind == "fill_mask":
        c.predict(FILL, 5, "", api_name="/fill_mask")
    else:
        c.predict(image, "cat, dog, car, rocket", "a photo of {}.", False, "softmax", 0,
                  "base model", api_name="/zero_shot")
    return time.perf_counter() - start


def idle_latency(c, image, rounds: int = 5) -> dict:
    out = {}
    for kind in ("fill_mask", "zero_shot"):
        short_call(c, kind, image)                       # warm
        out[kind] = statistics.median(short_call(c, kind, image) for _ in range(rounds))
    return out


def level(server: Server, clients: list, short_client, image, users: int, tokens: int,
          every: float) -> dict:
    ttfts, counts, shorts = [], [], {"fill_mask": [], "zero_shot": []}
    errors = []
    peak = [server.rss()]
    done = threading.Event()

    def user(i):
        try:
            ttft, n = generate(clients[i], PROMPTS[i % len(PROMPTS)], tokens)
            ttfts.append(ttft)
            counts.append(n)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            errors.append(repr(exc))

    def shorter():
        kinds = ("fill_mask", "zero_shot")
        i = 0
        while not done.is_set():
            kind = kinds[i % 2]
            shorts[kind].append(short_call(short_client, kind, image))
            i += 1
            done.wait(every)                 # one user clicking now and then

    def sampler():
        while not done.is_set():
            peak[0] = max(peak[0], server.rss())
            time.sleep(0.1)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    side = [threading.Thread(target=shorter), threading.Thread(target=sampler)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(0.5)                          # the short calls start once generation runs
    side[0].start()
    side[1].start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done.set()
    for t in side:
        t.join()
    return {"tok_s": sum(counts) / wall, "tokens": sum(counts), "wall": wall,
            "early": sum(n < tokens for n in counts),
            "ttft": ttfts, "short": shorts, "rss": peak[0], "errors": errors}


def rounds(n: int, run) -> dict:
    """`run()` n times: the median round's tokens/s and wall, every round's TTFTs and short
    calls, the peak RSS and every error."""
    runs = [run() for _ in range(max(1, n))]
    mid = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
    return {**mid, "ttft": [t for r in runs for t in r["ttft"]],
            "short": {k: [v for r in runs for v in r["short"][k]] for k in mid["short"]},
            "rss": max(r["rss"] for r in runs), "errors": [e for r in runs for e in r["errors"]],
            "early": sum(r["early"] for r in runs),
            "all_tok_s": [r["tok_s"] for r in runs]}


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random kit (fast, for a check)")
    p.add_argument("--users", default="1,4,8,16")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3,
                   help="runs of each level; its median tokens/s is reported (one user's "
                        "64 tokens take ~1 s, and the short call landing in them moves it)")
    p.add_argument("--short-every", type=float, default=1.0,
                   help="seconds between the short calls made during the generations")
    a = p.parse_args()
    kit = "tiny" if a.tiny else "offline"
    levels = [int(u) for u in a.users.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="mmcore-bench-serving-"))
    from gradio_client import handle_file
    from PIL import Image
    from skimage import data

    photo = logs / "cat.png"
    Image.fromarray(data.chelsea()).save(photo)
    image = handle_file(str(photo))
    servers = [Server(kit, "on", logs), Server(kit, "off", logs)]
    try:
        for s in servers:
            s.wait_ready()
        info = {}
        for s in servers:
            c = client(s.url)
            c.predict(api_name="/load_all")                        # every model loaded
            generate(c, PROMPTS[0], 8)                             # and run once
            s.clients = [client(s.url) for _ in range(max(levels))]
            s.short_client = client(s.url)
            # each client's session exists before it is timed, as a browser user's does from
            # page load: Gradio builds a session's copy of the page config at its first
            # request (~20 ms alone, 26-51 ms each with seven arriving together)
            for c in s.clients:
                short_call(c, "fill_mask", image)
            info[s.name] = {"idle": idle_latency(s.short_client, image), "levels": {}}
        for users in levels:                 # both servers level by level: noise hits both
            for s in servers:
                r = rounds(a.rounds, lambda: level(s, s.clients, s.short_client, image, users,
                                                    a.tokens, a.short_every))
                info[s.name]["levels"][users] = r
                print(f"{s.name:13s} {users:2d} users: {r['tok_s']:6.1f} tok/s "
                      f"({r['tokens']} tokens in {r['wall']:.1f} s; rounds "
                      f"{', '.join(f'{x:.1f}' for x in r['all_tok_s'])})"
                      + (f"  {r['early']} generations ended early (EOS)" if r["early"] else "")
                      + (f"  ERRORS {r['errors'][:2]}" if r["errors"] else ""), flush=True)
    finally:
        for s in servers:
            s.stop()
    print(f"\nkit {kit}, {a.tokens} new tokens per user, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end; short calls (fill-mask, zero-shot) one every "
          f"{a.short_every} s while the generations run")
    head = ("| mode | users | tokens/s | x 1 user | TTFT p50 / p95 (s) | fill-mask p50 / p95 "
            "(s) | zero-shot p50 / p95 (s) | peak RSS (MB) |")
    print(head)
    print("|" + "---|" * 8)
    for s in servers:
        base = info[s.name]["levels"][levels[0]]["tok_s"]
        idle = info[s.name]["idle"]
        print(f"| {s.name} | idle | | | | {idle['fill_mask']:.3f} | {idle['zero_shot']:.3f} | |")
        for users in levels:
            r = info[s.name]["levels"][users]
            fm, zs = r["short"]["fill_mask"], r["short"]["zero_shot"]
            short = [f"{pct(v, 50):.3f} / {pct(v, 95):.3f}" if v else "- (none ended)"
                     for v in (fm, zs)]
            print(f"| {s.name} | {users} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f} | "
                  f"{pct(r['ttft'], 50):.2f} / {pct(r['ttft'], 95):.2f} | "
                  f"{short[0]} | {short[1]} | {r['rss'] / 2**20:.0f} |")
    print("\nTargets (batching on): 8 users >= 4x one user's tokens/s; fill-mask during 8 "
          "generations < 3x idle; peak RSS at 16 users <= 1.25x at 1 user.")
    on = info[servers[0].name]
    lv = on["levels"]
    if 8 in lv and 1 in lv:
        print(f"  8 users / 1 user tokens/s: {lv[8]['tok_s'] / lv[1]['tok_s']:.2f}x")
        print(f"  fill-mask p50 during 8 / idle: "
              f"{pct(lv[8]['short']['fill_mask'], 50) / on['idle']['fill_mask']:.2f}x")
    if 16 in lv and 1 in lv:
        print(f"  RSS 16 users / 1 user: {lv[16]['rss'] / lv[1]['rss']:.2f}x")


if __name__ == "__main__":
    main()
