"""Generation speed on the offline kit's model, greedy, a 20-token prompt, 128 new tokens.

Side by side on this machine, interleaved: (a) transformers.pipeline("text-generation") fp32
with its defaults, (b) model.generate fp32 (both on the model as transformers loads it),
(c) mmcore's decode loop at `exact` (fp32, the GGUF dequantised; linears on oneDNN where
MKL's fp32 path is slow, see the first line), (d) mmcore at `fast` (the GGUF's own 4-bit blocks, int8 head, bf16
matmuls), (e) and (f) the same two with compiled decode steps (mmcore/compiled.py; their
compile time is printed first, from the inductor cache under $MMCORE_CACHE when warm). Prints tokens/s and time to first token of each, the ratios to (a), whether (b)
and (c) give the same tokens and where (d) first differs, and beside each decode rate the
roofline: weight bytes read per token, the measured read bandwidth, and the percent of the
bandwidth limit reached. The first line is the CPU's capability (bf16/VNNI/AMX, threads).

Last, the time to first token on a long prompt (`--long`, 400 tokens), where the prompt's
forward is most of it, and a prompt's forward on a GPT-2 base shape (the hub kit's LM) in
fp32, int8 weight-only and int8 x int8 (what its prompts run on at `fast`).

    .venv/bin/python bench/bench_generate.py [--new 128] [--rounds 2] [--threads 2]
                                             [--long 400]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MMCORE_COMPILE", "1")          # (e) and (f): compiled decode steps

PROMPT = "The history of the printing press begins in the fifteenth century, when a goldsmith from Mainz named"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--long", type=int, default=400, help="tokens of the long prompt")
    args = p.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import roofline

    print(roofline.header(args.threads))
    import mmcore
    from mmcore import generation as G
    from mmcore import hub, offline
    from mmcore.compiled import bucket as compiled_bucket
    from transformers import pipeline

    exact = mmcore.load_kit("offline", precision="exact").model("causal_lm")
    fast = mmcore.load_kit("offline", precision="fast").model("causal_lm")
    # (a) and (b) run the same weights as transformers loads them (exact may have moved its
    # linears to oneDNN: precision.onednn_fp32_pays)
    model, tok = hub.load_role("causal_lm", str(offline.smollm2_folder()), "cpu")
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

    def run_ours(lm, n, compiled):
        run = G.Generation(G.SamplingParams())
        sp = G.SamplingParams(max_new_tokens=n, temperature=0.0, chat=False)
        for _ in G.generate_tokens(lm.model, lm.tokenizer, PROMPT, sp, run=run,
                                   compiled=lm.compiled() if compiled else None):
            pass
        return run.seconds, [t.token_id for t in run.tokens], run.ttft

    names = {"a": "pipeline fp32", "b": "model.generate fp32", "c": "mmcore exact",
             "d": "mmcore fast", "e": "mmcore exact compiled", "f": "mmcore fast compiled"}
    ours = {"c": (exact, False), "d": (fast, False), "e": (exact, True), "f": (fast, True)}
    if not all(lm.compiled() for lm, _ in ours.values()):
        print("  (compiled decoding is off: MMCORE_COMPILE=0 or no C++ compiler)")
        for key in "ef":
            ours.pop(key), names.pop(key)
    for key, (lm, on) in ours.items():
        if on:
            compiled = lm.compiled()
            size = compiled_bucket(n_prompt + args.new)
            compiled.session(n_prompt + args.new, wait=False)     # starts its compile
            start = time.perf_counter()
            state = compiled.wait(size)
            print(f"  {names[key]}: compiled the {size}-position step in "
                  f"{time.perf_counter() - start:.0f} s ({state}; inductor cache "
                  f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR')})", flush=True)
    run_pipeline(4), run_generate(4)
    for lm, on in ours.values():
        run_ours(lm, 4, on)                                                    # warm up
    keys = list(names)
    best = {k: (1e9, 1e9) for k in keys}
    toks = {}
    for _ in range(args.rounds):
        t_a, ttft_a = run_pipeline(args.new), run_pipeline(1)
        (t_b, toks["b"]), (ttft_b, _) = run_generate(args.new), run_generate(1)
        got = {"a": (t_a, ttft_a), "b": (t_b, ttft_b)}
        for key, (lm, on) in ours.items():
            t, toks[key], ttft = run_ours(lm, args.new, on)
            got[key] = (t, ttft)
        for key, (t, ttft) in got.items():
            best[key] = (min(best[key][0], t), min(best[key][1], ttft))
    counts = {k: len(toks[k]) if k in toks and k != "b" else args.new for k in keys}
    rate = {k: counts[k] / best[k][0] for k in keys}
    bandwidth = roofline.read_bandwidth()
    weights = {k: fast.model if k in "df" else model for k in keys}
    print(f"offline causal LM, {n_prompt}-token prompt, {args.new} new tokens, greedy, "
          f"{torch.get_num_threads()} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    for key in keys:
        per_token = roofline.bytes_per_token(weights[key])
        decode = (counts[key] - 1) / max(best[key][0] - best[key][1], 1e-9)
        roof = bandwidth / per_token
        print(f"  ({key}) {names[key]:22s} {rate[key]:6.1f} tok/s ({rate[key] / rate['a']:4.2f}x)"
              f"  first token {best[key][1] * 1000:5.0f} ms  |  {per_token / 1e6:4.0f} MB/token,"
              f" roof {roof:5.0f} tok/s, decode {decode:5.1f} tok/s = {decode / roof:4.0%}")

    def agree(x, y):
        return next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))

    print(f"  (b) and (c) give the same tokens: {toks['b'][:len(toks['c'])] == toks['c']} "
          f"({len(toks['c'])} compared); (d) matches (c) for the first {agree(toks['c'], toks['d'])}"
          " tokens" + (f"; (e) matches (c) for {agree(toks['c'], toks['e'])}, (f) matches (d) "
                       f"for {agree(toks['d'], toks['f'])}" if "e" in toks else ""))
    # a fast path that goes wrong still runs at full speed: its rate means nothing then
    # (compiled `fast` once decoded garbage from token 2 and was reported at 2.89x)
    for key, like in (("d", "c"), ("e", "c"), ("f", "d")):
        at = agree(toks[like], toks[key]) if key in toks else args.new
        if at < min(32, args.new):
            print(f"  ** ({key}) leaves ({like})'s tokens at token {at}: check its text "
                  f"before reading its rate: {fast.tokenizer.decode(toks[key][:24])!r}")
    if args.long > 0:
        long_prompts(pipe, exact, fast, args.long, args.rounds)
    sampling(pipe, fast, args.new, args.rounds)
    int8_prompts(args.rounds)


SAMPLING = {"Chat's default (temperature 0.7)": dict(temperature=0.7),
            "Generate's default (0.7, top-k 50, top-p 0.95, penalty 1.1)":
                dict(temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.1),
            "an API client's (0.7, top-p 0.9)": dict(temperature=0.7, top_p=0.9)}


def sampling(pipe, fast, n: int, rounds: int) -> None:
    """What choosing a sampled token costs over SmolLM2's 49,152-word vocabulary: ours
    (`_process` + `draw`) against transformers' warpers + `torch.multinomial` (what
    `generate(do_sample=True)` runs), per token and in a whole sampled generation."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    from mmcore import generation as G

    torch.manual_seed(0)
    row = torch.randn(49152) * 4
    seen = torch.randint(0, 49152, (60,))
    g = torch.Generator().manual_seed(0)

    def per_token(fn, repeat=200):
        fn()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) / repeat

    print("choosing one sampled token (49,152 logits):")
    for label, kw in SAMPLING.items():
        p = G.SamplingParams(max_new_tokens=8, **kw).check()
        steps = [RepetitionPenaltyLogitsProcessor(p.repetition_penalty)] \
            if p.repetition_penalty != 1.0 else []
        steps.append(TemperatureLogitsWarper(p.temperature))
        steps += [TopKLogitsWarper(p.top_k)] if p.top_k else []
        steps += [TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []
        theirs = LogitsProcessorList(steps)

        def ref():
            scores = theirs(seen[None], row[None].clone())
            return int(torch.multinomial(scores.softmax(-1), 1, generator=g))

        t_ref = per_token(ref)
        t_ours = per_token(lambda: G.draw(G._process(row, seen, p), g))
        print(f"  {label:62s} transformers {t_ref * 1e3:5.2f} ms, ours {t_ours * 1e3:5.2f} ms "
              f"({t_ref / t_ours:4.1f}x)")

    kw = SAMPLING["an API client's (0.7, top-p 0.9)"]

    def theirs_run():
        start = time.perf_counter()
        pipe(PROMPT, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=0,
             return_tensors=True, **kw)
        return n / (time.perf_counter() - start)

    def ours_run():
        run = G.Generation(G.SamplingParams())
        for _ in G.generate_tokens(fast.model, fast.tokenizer, PROMPT,
                                   G.SamplingParams(max_new_tokens=n, chat=False, seed=0, **kw),
                                   run=run, compiled=fast.compiled()):
            pass
        return len(run.tokens) / run.seconds

    best_ref = max(theirs_run() for _ in range(rounds))
    best_ours = max(ours_run() for _ in range(rounds))
    print(f"sampled generation ({n} tokens, temperature 0.7, top-p 0.9): pipeline fp32 "
          f"{best_ref:.1f} tok/s, mmcore fast {best_ours:.1f} tok/s ({best_ours / best_ref:.2f}x)")


def long_prompts(pipe, exact, fast, size: int, rounds: int) -> None:
    """Time to first token on a prompt of `size` tokens (a chat history's length): the
    prompt's forward is most of it, where `fast` runs on its two-pass int8 twin."""
    from mmcore import generation as G
    from mmcore import tiny

    tok = exact.tokenizer
    words = " ".join(line.strip() for line in tiny.SENTENCES.splitlines() if line.strip())
    text = words
    while len(tok(text)["input_ids"]) < size:
        text += " " + words
    text = tok.decode(tok(text)["input_ids"][:size])

    def ours(lm):
        run = G.Generation(G.SamplingParams())
        for _ in G.generate_tokens(lm.model, lm.tokenizer, text,
                                   G.SamplingParams(max_new_tokens=1, chat=False), run=run):
            pass
        return run.ttft

    def theirs():
        start = time.perf_counter()
        pipe(text, max_new_tokens=1)
        return time.perf_counter() - start

    fns = {"pipeline fp32": theirs, "mmcore exact": lambda: ours(exact),
           "mmcore fast": lambda: ours(fast)}
    best = {name: min(fn() for _ in range(rounds + 1)) for name, fn in fns.items()}
    print(f"{size}-token prompt, time to first token (best of {rounds + 1}): " + ", ".join(
        f"{name} {t * 1000:.0f} ms ({best['pipeline fp32'] / t:.2f}x)"
        for name, t in best.items()))


def int8_prompts(rounds: int) -> None:
    """A prompt's forward on a GPT-2 base shape (random weights: the compute of `gpt2`, the
    hub kit's LM) in fp32, at `fast` on the weight-only int8 kernel (the model itself), and
    on its two-pass int8 x int8 twin (`quantized_lm.prefill_model`, what prompts run on)."""
    import copy

    from transformers import GPT2Config, GPT2LMHeadModel

    from mmcore import precision, quantized_lm

    torch.manual_seed(0)
    fp32 = GPT2LMHeadModel(GPT2Config()).eval()
    model = copy.deepcopy(fp32)
    form = precision.fast_causal_lm(model)
    runner = quantized_lm.prefill_model(model)
    if runner is model:
        print(f"GPT-2 base shape: no int8 x int8 prompts on this CPU ({form})")
        return
    for size in (16, 100, 400):
        ids = torch.randint(0, 50000, (1, size))

        def best(m):
            with torch.inference_mode():
                times = []
                for _ in range(rounds + 1):
                    start = time.perf_counter()
                    m(input_ids=ids, logits_to_keep=1)
                    times.append(time.perf_counter() - start)
            return min(times) * 1000

        a, b, c = best(fp32), best(model), best(runner)
        print(f"GPT-2 base shape, {size:3d}-token prompt's forward: fp32 {a:5.0f} ms, int8 "
              f"weight-only {b:5.0f} ms, int8 x int8 two-pass {c:5.0f} ms ({b / c:.2f}x the "
              f"weight-only, {a / c:.2f}x fp32)")


if __name__ == "__main__":
    main()
