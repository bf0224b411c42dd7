"""Fill-mask speed, side by side on the same machine.

(1) Ours at `exact` (fp32) and `fast` (bf16 where the CPU has native bf16) against
    `transformers.pipeline("fill-mask")` fp32 on a bert-base-sized BertForMaskedLM (random
    weights cost the same compute as bert-base-uncased), batch 1, single-mask sentences of
    8-64 tokens: sequences/s of each, the ratio, and the roofline (weight bytes read per
    forward over the measured read bandwidth: at batch 1 a short sentence is memory-bound).
(2) The offline kit (causal-LM backend): median latency per single-mask query over the
    probe set, `exact` and `fast` interleaved.
(3) Micro-batching of short requests on the offline kit: 1 and 8 concurrent users (threads)
    each making short fill-mask (or NSP) requests back to back, through a served kit
    (`kit.serve()`: candidates of concurrent requests scored in shared forwards) and a plain
    one (each request its own forwards) on the same loaded model, interleaved: p50/p95
    latency, requests/s, and batched over unbatched.

    .venv/bin/python bench/bench_fill_mask.py [--rounds 3] [--threads 2]
    .venv/bin/python bench/bench_fill_mask.py --only-concurrency [--requests 3]
                                              [--precision exact]
"""

import argparse
import csv
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def sentences(tok, n: int = 40, seed: int = 0) -> list:
    from mmcore import tiny

    words = " ".join(tiny.corpus()).lower().replace(".", " ").split()
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        length = rng.randint(6, 60)                       # + [CLS] [SEP] (+ pieces): 8..64
        start = rng.randrange(len(words) - length)
        chunk = words[start:start + length]
        chunk[rng.randrange(length)] = "[MASK]"
        text = " ".join(chunk)
        if 8 <= len(tok(text)["input_ids"]) <= 64:
            out.append(text)
    return out


def bert_base_side_by_side(rounds: int) -> None:
    import copy

    from transformers import BertConfig, BertForMaskedLM, pipeline

    import mmcore
    import roofline
    from common import best_rates
    from mmcore import fill_mask, precision
    from mmcore.roles import MaskedLM

    tok = mmcore.load_kit("tiny").model("masked_lm").tokenizer
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig()).eval()          # bert-base-uncased's shape
    exact_model = copy.deepcopy(model)                    # linears on oneDNN where that pays
    loaded = MaskedLM(exact_model, tok, "bert-base random", precision.convert(
        "exact", exact_model, None, lambda: precision.exact_linears(exact_model)))
    fast_model = copy.deepcopy(model)
    form = precision.convert("fast", fast_model, lambda: MaskedLM.make_fast(fast_model))
    fast = MaskedLM(fast_model, tok, "bert-base random", form)
    bf16 = MaskedLM(copy.deepcopy(model).to(torch.bfloat16), tok, "bert-base random")
    pipe = pipeline("fill-mask", model=model, tokenizer=tok)
    items = sentences(tok)
    fns = {"pipeline fp32": lambda: [pipe(s, top_k=5) for s in items],
           "mmcore exact": lambda: [fill_mask.fill(loaded, s, 5) for s in items],
           "mmcore fast": lambda: [fill_mask.fill(fast, s, 5) for s in items]}
    if precision.capability().bf16:                  # shown even where `fast` does not pick it
        fns["mmcore bf16"] = lambda: [fill_mask.fill(bf16, s, 5) for s in items]
    got = best_rates(fns, len(items), rounds)
    bandwidth = roofline.read_bandwidth()
    print(f"bert-base fill-mask, batch 1, {len(items)} sentences of 8-64 tokens, "
          f"{torch.get_num_threads()} threads; fast = {form}; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s")
    sizes = {"pipeline fp32": precision.weight_bytes(model),
             "mmcore exact": precision.weight_bytes(exact_model),
             "mmcore fast": precision.weight_bytes(fast.model),
             "mmcore bf16": precision.weight_bytes(bf16.model)}
    for name, rate in got.items():
        roof = bandwidth / sizes[name]
        print(f"  {name:14s} {rate:6.1f} sequences/s  {rate / got['pipeline fp32']:5.2f}x  |  "
              f"{sizes[name] / 1e6:4.0f} MB read per forward, roof {roof:5.1f}/s = "
              f"{rate / roof:4.0%}")


def offline_latency() -> None:
    import mmcore

    kits = {p: mmcore.load_kit("offline", precision=p) for p in ("exact", "fast")}
    with open(ROOT / "tests/data/fill_mask_probes.tsv", encoding="utf-8") as f:
        probes = [r["sentence"] for r in csv.DictReader(f, delimiter="\t")]
    times = {p: [] for p in kits}
    for kit in kits.values():
        kit.fill_mask(probes[0])
    for text in probes:                                   # interleaved: noise hits both
        for p, kit in kits.items():
            start = time.perf_counter()
            kit.fill_mask(text)
            times[p].append(time.perf_counter() - start)
    print(f"offline kit ({kits['exact'].spec('masked_lm').name}), {len(probes)} single-mask "
          f"probes:")
    for p, ts in times.items():
        print(f"  {p:5s} median latency {statistics.median(ts) * 1000:4.0f} ms, "
              f"p90 {sorted(ts)[int(0.9 * len(ts))] * 1000:4.0f} ms")
    ratios = sorted(e / f for e, f in zip(times["exact"], times["fast"]))
    print(f"  exact/fast per probe: median {statistics.median(ratios):.2f}x "
          f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}x)")


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def drive(call, work: list, users: int, per_user: int) -> tuple:
    """`users` threads, each making `per_user` calls back to back: (latencies, seconds)."""
    latencies, lock = [], threading.Lock()

    def user(u):
        for i in range(per_user):
            item = work[(u * per_user + i) % len(work)]
            start = time.perf_counter()
            call(item)
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - start


def offline_concurrency(per_user: int, precision=None, levels=(1, 8)) -> None:
    import mmcore
    from mmcore import kits, nsp

    plain = mmcore.load_kit("offline", precision=precision)
    served = kits.Kit(plain.name, plain.specs, precision=plain.precision).serve()
    with open(ROOT / "tests/data/fill_mask_probes.tsv", encoding="utf-8") as f:
        probes = [r["sentence"] for r in csv.DictReader(f, delimiter="\t")]
    pairs = [(a, b) for a, b, _ in nsp.labelled_pairs()]
    tasks = {"fill-mask": (probes, lambda kit: lambda text: kit.fill_mask(text)),
             "NSP": (pairs, lambda kit: lambda pair: kit.next_sentence(*pair))}
    lm = plain.model("causal_lm")
    print(f"offline kit ({lm.name}, {plain.precision}), short requests from concurrent users, "
          f"{per_user} each, {torch.get_num_threads()} threads:")
    if lm.scorer() is None:
        print("  scoring is not shared across requests at this precision on this device (see "
              "CausalLM.scorer); run with --precision exact to measure sharing")
        return
    for task, (work, make) in tasks.items():
        make(plain)(work[0])                               # warm
        for users in levels:
            got = {}
            for mode, kit in (("unbatched", plain), ("batched", served)):
                scorer = lm.scorer()
                before, scorer.peak = scorer.batches, 0
                lat, wall = drive(make(kit), work, users, per_user)
                got[mode] = (statistics.median(lat), percentile(lat, 0.95), len(lat) / wall)
                shared = scorer.batches - before
                print(f"  {task:9s} {users} user(s) {mode:9s} p50 {got[mode][0] * 1000:6.0f} ms  "
                      f"p95 {got[mode][1] * 1000:6.0f} ms  {got[mode][2]:5.2f} req/s"
                      + (f"  ({shared} scoring forwards, up to {scorer.peak} requests in one)"
                         if mode == "batched" else ""))
            b, u = got["batched"], got["unbatched"]
            print(f"  {task:9s} {users} user(s) batched/unbatched: p50 {b[0] / u[0]:.2f}x  "
                  f"p95 {b[1] / u[1]:.2f}x  throughput {b[2] / u[2]:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--only-concurrency", action="store_true", help="part (3) only")
    p.add_argument("--requests", type=int, default=3, help="per user, part (3)")
    p.add_argument("--precision", default=None, help="part (3): exact or fast (default: auto)")
    args = p.parse_args()
    import roofline

    print(roofline.header(args.threads))
    if not args.only_concurrency:
        bert_base_side_by_side(args.rounds)
        if not args.skip_offline:
            offline_latency()
    offline_concurrency(args.requests, args.precision)


if __name__ == "__main__":
    main()
