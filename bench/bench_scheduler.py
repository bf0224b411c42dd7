"""The generation scheduler alone (no app) on any device: does the shared batch give every
stream what it gets alone, and how do tokens/s grow with the batch?

    .venv/bin/python bench/bench_scheduler.py [--device cuda] [--dtype bfloat16]
        [--model FOLDER | --random-from FOLDER] [--batches 1,8,32] [--tokens 64]

`--model` loads a causal LM folder (default: the offline kit's SmolLM2); `--random-from`
builds one with random weights from a folder's config and tokenizer (speed only). Prints,
per stream, whether greedy and seeded output equal `generation.generate_tokens` at batch 1
on the same device and dtype, then aggregate tokens/s per batch size next to batch-1
`generate_tokens`.
"""

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmcore import generation as G  # noqa: E402
from mmcore import serving as S  # noqa: E402
from mmcore.lanes import release_threads  # noqa: E402

PROMPTS = ["Once upon a time, in a village by the mountains,", "The sea is",
           "Here is a short guide to growing tomatoes at home:", "Hi",
           "The history of the printing press begins in the fifteenth century, when",
           "Scientists announced today that"]


def load(args):
    import transformers as tf

    dtype = getattr(torch, args.dtype)
    if args.random_from:
        config = tf.AutoConfig.from_pretrained(args.random_from)
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
        tok = tf.AutoTokenizer.from_pretrained(args.random_from)
    else:
        folder = args.model
        if folder is None:
            from mmcore import offline

            folder = offline.smollm2_folder()
        model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tok = tf.AutoTokenizer.from_pretrained(folder)
    return model.eval().to(args.device), tok


def together(sched, jobs):
    runs = [G.Generation(G.SamplingParams()) for _ in jobs]

    def user(i, prompt, params):
        for _ in sched.generate_tokens(prompt, params, run=runs[i]):
            pass

    threads = [threading.Thread(target=user, args=(i, p, params))
               for i, (p, params) in enumerate(jobs)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return runs, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model", default=None)
    p.add_argument("--random-from", default=None)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    model, tok = load(args)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{type(model).__name__} on {name}, {args.dtype}")
    sched = S.Scheduler(model, tok, S.ServingConfig(max_batch=64))
    try:
        jobs = [(prompt, G.SamplingParams(max_new_tokens=32, chat=False)) for prompt in PROMPTS]
        jobs += [(prompt, G.SamplingParams(max_new_tokens=32, chat=False, temperature=0.8,
                                           top_k=50, top_p=0.95, seed=i))
                 for i, prompt in enumerate(PROMPTS[:3])]
        release_threads()       # (lanes.release_threads: the model was loaded here)
        runs, _ = together(sched, jobs)
        same = 0
        for (prompt, params), run in zip(jobs, runs):
            alone = G.Generation(params)
            for _ in G.generate_tokens(model, tok, prompt, params, run=alone):
                pass
            ok = [t.token_id for t in run.tokens] == [t.token_id for t in alone.tokens]
            same += ok
            print(f"  {'same' if ok else 'DIFFERENT'}: {len(run.tokens):2d} tokens, "
                  f"T={params.temperature}, {prompt[:40]!r}")
        print(f"batched = batch-1 for {same} of {len(jobs)} streams (peak batch "
              f"{sched.peak_batch})")

        params = G.SamplingParams(max_new_tokens=args.tokens, chat=False)
        for _ in range(2):                                     # warm-up
            list(G.generate_tokens(model, tok, PROMPTS[0], params))
        start = time.perf_counter()
        n = len(list(G.generate_tokens(model, tok, PROMPTS[0], params)))
        base = n / (time.perf_counter() - start)
        print(f"generate_tokens, batch 1: {base:.1f} tokens/s")
        release_threads()       # the main thread's OpenMP workers would slow the scheduler's
        for b in [int(x) for x in args.batches.split(",")]:
            runs, wall = together(sched, [(PROMPTS[i % len(PROMPTS)], params)
                                          for i in range(b)])
            rate = sum(len(r.tokens) for r in runs) / wall
            print(f"scheduler, {b:3d} streams: {rate:8.1f} tokens/s ({rate / base:5.2f}x)")
    finally:
        sched.close()


if __name__ == "__main__":
    main()
