"""Fill-mask speed, side by side on the same machine.

(1) Ours against `transformers.pipeline("fill-mask")` on a bert-base-sized BertForMaskedLM
    (random weights cost the same compute as bert-base-uncased), batch 1, single-mask
    sentences of 8-64 tokens: sequences/s of each and the ratio.
(2) The offline kit (causal-LM backend): median latency per single-mask query over the
    probe set.

    .venv/bin/python bench/bench_fill_mask.py [--rounds 3]
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
    from transformers import BertConfig, BertForMaskedLM, pipeline

    import mmcore
    from common import best_rates
    from mmcore import fill_mask
    from mmcore.kits import Loaded, ModelSpec

    tok = mmcore.load_kit("tiny").model("masked_lm").parts["processor"]
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig()).eval()          # bert-base-uncased's shape
    loaded = Loaded(ModelSpec("hf", "bench", "bert-base random", "", "masked_lm"),
                    "masked_lm", {"model": model, "processor": tok}, 0.0)
    pipe = pipeline("fill-mask", model=model, tokenizer=tok)
    items = sentences(tok)
    got = best_rates({"ours": lambda: [fill_mask.fill(loaded, s, 5) for s in items],
                      "theirs": lambda: [pipe(s, top_k=5) for s in items]}, len(items), rounds)
    ours, theirs = got["ours"], got["theirs"]
    print(f"bert-base fill-mask, batch 1, {len(items)} sentences of 8-64 tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"  pipeline('fill-mask'): {theirs:6.1f} sequences/s")
    print(f"  mmcore fill_mask:      {ours:6.1f} sequences/s")
    print(f"  ratio ours/pipeline:   {ours / theirs:6.2f}x")


def offline_latency() -> None:
    import mmcore

    kit = mmcore.load_kit("offline")
    with open(ROOT / "tests/data/fill_mask_probes.tsv", encoding="utf-8") as f:
        probes = [r["sentence"] for r in csv.DictReader(f, delimiter="\t")]
    kit.fill_mask(probes[0])
    times = []
    for text in probes:
        start = time.perf_counter()
        kit.fill_mask(text)
        times.append(time.perf_counter() - start)
    print(f"offline kit ({kit.spec('masked_lm').name}), {len(probes)} single-mask probes:")
    print(f"  median latency {statistics.median(times) * 1000:.0f} ms, "
          f"p90 {sorted(times)[int(0.9 * len(times))] * 1000:.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-offline", action="store_true")
    args = p.parse_args()
    bert_base_side_by_side(args.rounds)
    if not args.skip_offline:
        offline_latency()


if __name__ == "__main__":
    main()
