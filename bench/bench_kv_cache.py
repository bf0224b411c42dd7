"""A decode step on transformers' DynamicCache (appends by torch.cat: the whole cache copied
every step) against mmcore's in-place layers (`mmcore.kv_cache`), side by side on the
offline kit's causal LM, at several batch sizes and cache lengths.

For each (rows, positions): the rows prefilled to that length, then `--steps` greedy decode
steps on each cache, rounds interleaved; prints the median step time of each, the ratio,
and whether both gave the same logits at every step (they must: the same values are read).
Below `kv_cache.IN_PLACE_FROM` rows x positions ours appends by torch.cat too; pass
`--in-place-from 0` to time in-place appends at every size.

    .venv/bin/python bench/bench_kv_cache.py [--precision fast] [--shapes 1x70,8x70,8x400,16x300]
                                             [--steps 40] [--rounds 3] [--in-place-from N]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MMCORE_COMPILE", "0")

TEXT = ("The history of the printing press begins in the fifteenth century, when a goldsmith "
        "from Mainz named Johannes Gutenberg combined movable metal type, oil-based ink and a "
        "screw press adapted from winemaking. ") * 40


def steps(model, ids, roomy: bool, count: int) -> tuple:
    """(per-step seconds, logits of every step) of `count` greedy decode steps after a
    prefill of `ids` (rows, positions)."""
    from transformers import DynamicCache

    from mmcore.kv_cache import with_room
    from mmcore.quantized_lm import prefill_model

    cache = DynamicCache(config=model.config)
    out = prefill_model(model)(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    if roomy:
        with_room(cache)
    feed = out.logits[:, -1].argmax(-1, keepdim=True)
    times, logits = [], []
    for _ in range(count):
        start = time.perf_counter()
        last = model(input_ids=feed, cache=cache, use_cache=True).logits[:, -1]
        feed = last.argmax(-1, keepdim=True)
        times.append(time.perf_counter() - start)
        logits.append(last)
    return times, logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="fast")
    p.add_argument("--shapes", default="1x70,8x70,8x200,8x400,16x300")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--in-place-from", type=int, default=None)
    a = p.parse_args()
    if a.in_place_from is not None:
        from mmcore import kv_cache

        kv_cache.IN_PLACE_FROM = a.in_place_from

    import mmcore
    from mmcore import precision
    from mmcore.lanes import release_threads

    print(precision.capability().line())
    lm = mmcore.load_kit("offline", precision=a.precision).model("causal_lm")
    model, tok = lm.model, lm.tokenizer
    release_threads()
    text_ids = tok(TEXT, return_tensors="pt").input_ids
    print(f"{type(model).__name__} at {a.precision}, {a.steps} decode steps a round, median "
          f"step of {a.rounds} interleaved rounds (first 3 steps of each left out)")
    print("| rows x positions | DynamicCache (ms/step) | in place (ms/step) | ratio | same logits |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for shape in a.shapes.split(","):
            rows, length = map(int, shape.split("x"))
            ids = text_ids[:, :length].repeat(rows, 1)
            per = {False: [], True: []}
            same = True
            for _ in range(a.rounds):
                got = {}
                for roomy in (False, True):
                    times, logits = steps(model, ids, roomy, a.steps)
                    per[roomy] += times[3:]
                    got[roomy] = logits
                same &= all(torch.equal(x, y) for x, y in zip(got[False], got[True]))
            old, new = (statistics.median(per[k]) * 1e3 for k in (False, True))
            print(f"| {rows} x {length} | {old:.2f} | {new:.2f} | {old / new:.2f}x | "
                  f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
