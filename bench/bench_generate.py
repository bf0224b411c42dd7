"""Generation speed on the offline kit's model, greedy, a 20-token prompt, 128 new tokens.

Side by side on this machine: (a) transformers.pipeline("text-generation") with its
defaults, (b) model.generate at the dtype we use, (c) mmcore's decode loop. Prints tokens/s
and time to first token of each, the ratios, whether (b) and (c) give the same tokens, and
the fraction of the memory-bandwidth limit reached (weight bytes read per token x tokens/s
over a measured copy bandwidth).

    .venv/bin/python bench/bench_generate.py [--new 128] [--rounds 2]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPT = "The history of the printing press begins in the fifteenth century, when a goldsmith from Mainz named"


def copy_bandwidth(megabytes: int = 512) -> float:
    """Bytes moved per second (read + write) copying a large tensor."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - start))
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    import mmcore
    from mmcore import generation as G
    from transformers import pipeline

    parts = mmcore.load_kit("offline").model("causal_lm").parts
    model, tok = parts["model"], parts["processor"]
    ids = tok(PROMPT, return_tensors="pt")
    n_prompt = ids["input_ids"].shape[1]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    params = dict(max_new_tokens=args.new, min_new_tokens=args.new)

    def run_pipeline(n):
        start = time.perf_counter()
        pipe(PROMPT, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - start

    def run_generate(n):
        start = time.perf_counter()
        out = model.generate(**ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - start, out[0, n_prompt:].tolist()

    def run_ours(n):
        run = G.Generation(G.SamplingParams())
        sp = G.SamplingParams(max_new_tokens=n, temperature=0.0, chat=False)
        # min_new_tokens for a like-for-like count: the bench prompt does not hit EOS early
        for _ in G.generate_tokens(model, tok, PROMPT, sp, run=run):
            pass
        return run.seconds, [t.token_id for t in run.tokens], run.ttft

    run_pipeline(4), run_generate(4), run_ours(4)                      # warm up
    best = {"a": (1e9, 1e9), "b": (1e9, 1e9), "c": (1e9, 1e9)}
    for _ in range(args.rounds):
        t_a, ttft_a = run_pipeline(args.new), run_pipeline(1)
        (t_b, toks_b), (ttft_b, _) = run_generate(args.new), run_generate(1)
        t_c, toks_c, ttft_c = run_ours(args.new)
        for key, t, ttft in (("a", t_a, ttft_a), ("b", t_b, ttft_b), ("c", t_c, ttft_c)):
            best[key] = (min(best[key][0], t), min(best[key][1], ttft))
    n_c = len(toks_c)
    rate = {"a": args.new / best["a"][0], "b": args.new / best["b"][0], "c": n_c / best["c"][0]}
    print(f"offline causal LM, {n_prompt}-token prompt, {args.new} new tokens, greedy, "
          f"{torch.get_num_threads()} threads, dtype {model.dtype}")
    for key, name in (("a", "pipeline (defaults)"), ("b", "model.generate"), ("c", "mmcore")):
        print(f"  ({key}) {name:20s} {rate[key]:6.1f} tokens/s   first token {best[key][1] * 1000:5.0f} ms")
    print(f"  ratio (c)/(a): {rate['c'] / rate['a']:.2f}x   ratio (c)/(b): {rate['c'] / rate['b']:.2f}x")
    print(f"  (b) and (c) give the same tokens: {toks_b[:n_c] == toks_c}  ({n_c} compared)")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth()
    decode_rate = (n_c - 1) / (best["c"][0] - best["c"][1])
    print(f"  weights {weight_bytes / 1e6:.0f} MB per token; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"decode {decode_rate:.1f} tokens/s = {weight_bytes * decode_rate / bandwidth:.0%} "
          f"of the bandwidth limit")


if __name__ == "__main__":
    main()
