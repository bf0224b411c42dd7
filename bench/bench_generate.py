"""Generation speed on the offline kit's model, greedy, a 20-token prompt, 128 new tokens.

Side by side on this machine, interleaved: (a) transformers.pipeline("text-generation") fp32
with its defaults, (b) model.generate fp32, (c) mmcore's decode loop at `exact` (fp32, the
GGUF dequantised), (d) mmcore at `fast` (the GGUF's own 4-bit blocks, int8 head, bf16
matmuls). Prints tokens/s and time to first token of each, the ratios to (a), whether (b)
and (c) give the same tokens and where (d) first differs, and beside each decode rate the
roofline: weight bytes read per token, the measured read bandwidth, and the percent of the
bandwidth limit reached. The first line is the CPU's capability (bf16/VNNI/AMX, threads).

    .venv/bin/python bench/bench_generate.py [--new 128] [--rounds 2] [--threads 2]
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import roofline

    print(roofline.header(args.threads))
    import mmcore
    from mmcore import generation as G
    from transformers import pipeline

    exact = mmcore.load_kit("offline", precision="exact").model("causal_lm")
    fast = mmcore.load_kit("offline", precision="fast").model("causal_lm")
    model, tok = exact.model, exact.tokenizer
    ids = tok(PROMPT, return_tensors="pt")
    n_prompt = ids["input_ids"].shape[1]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)

    def run_pipeline(n):
        start = time.perf_counter()
        pipe(PROMPT, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - start

    def run_generate(n):
        start = time.perf_counter()
        out = model.generate(**ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - start, out[0, n_prompt:].tolist()

    def run_ours(lm, n):
        run = G.Generation(G.SamplingParams())
        sp = G.SamplingParams(max_new_tokens=n, temperature=0.0, chat=False)
        for _ in lm.generate_tokens(PROMPT, sp, run=run):
            pass
        return run.seconds, [t.token_id for t in run.tokens], run.ttft

    run_pipeline(4), run_generate(4), run_ours(exact, 4), run_ours(fast, 4)     # warm up
    best = {k: (1e9, 1e9) for k in "abcd"}
    for _ in range(args.rounds):
        t_a, ttft_a = run_pipeline(args.new), run_pipeline(1)
        (t_b, toks_b), (ttft_b, _) = run_generate(args.new), run_generate(1)
        t_c, toks_c, ttft_c = run_ours(exact, args.new)
        t_d, toks_d, ttft_d = run_ours(fast, args.new)
        for key, t, ttft in (("a", t_a, ttft_a), ("b", t_b, ttft_b), ("c", t_c, ttft_c),
                             ("d", t_d, ttft_d)):
            best[key] = (min(best[key][0], t), min(best[key][1], ttft))
    counts = {"a": args.new, "b": args.new, "c": len(toks_c), "d": len(toks_d)}
    rate = {k: counts[k] / best[k][0] for k in "abcd"}
    bandwidth = roofline.read_bandwidth()
    weights = {"a": model, "b": model, "c": model, "d": fast.model}
    print(f"offline causal LM, {n_prompt}-token prompt, {args.new} new tokens, greedy, "
          f"{torch.get_num_threads()} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    names = {"a": "pipeline fp32", "b": "model.generate fp32", "c": "mmcore exact",
             "d": "mmcore fast"}
    for key in "abcd":
        per_token = roofline.bytes_per_token(weights[key])
        decode = (counts[key] - 1) / max(best[key][0] - best[key][1], 1e-9)
        roof = bandwidth / per_token
        print(f"  ({key}) {names[key]:20s} {rate[key]:6.1f} tok/s ({rate[key] / rate['a']:4.2f}x)"
              f"  first token {best[key][1] * 1000:5.0f} ms  |  {per_token / 1e6:4.0f} MB/token,"
              f" roof {roof:5.0f} tok/s, decode {decode:5.1f} tok/s = {decode / roof:4.0%}")
    same_d = next((i for i, (x, y) in enumerate(zip(toks_c, toks_d)) if x != y), len(toks_d))
    print(f"  (b) and (c) give the same tokens: {toks_b[:len(toks_c)] == toks_c} "
          f"({len(toks_c)} compared); (d) matches (c) for the first {same_d} tokens")


if __name__ == "__main__":
    main()
