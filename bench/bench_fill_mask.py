"""Fill-mask speed, side by side on the same machine.

(1) Ours at `exact` (fp32) and `fast` (bf16 where the CPU has native bf16) against
    `transformers.pipeline("fill-mask")` fp32 on a bert-base-sized BertForMaskedLM (random
    weights cost the same compute as bert-base-uncased), batch 1, single-mask sentences of
    8-64 tokens: sequences/s of each, the ratio, and the roofline (weight bytes read per
    forward over the measured read bandwidth: at batch 1 a short sentence is memory-bound).
(2) The offline kit (causal-LM backend): median latency per single-mask query over the
    probe set, `exact` and `fast` interleaved.

    .venv/bin/python bench/bench_fill_mask.py [--rounds 3] [--threads 2]
"""

import argparse
import csv
import os
import random
import statistics
import sys
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
    loaded = MaskedLM(model, tok, "bert-base random")
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
             "mmcore exact": precision.weight_bytes(model),
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    import roofline

    print(roofline.header(args.threads))
    bert_base_side_by_side(args.rounds)
    if not args.skip_offline:
        offline_latency()


if __name__ == "__main__":
    main()
