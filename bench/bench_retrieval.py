"""Retrieval speed, side by side on this machine.

(a) Embedding images/s on a ViT-B/32-sized CLIPModel: mmcore's Index.add (batched, decoding
    in threads while the model runs) against a per-image loop (PIL open, CLIPProcessor, model,
    batch 1).
(b) Median exact-search latency over 100k random unit vectors of dim 512.
(c) At 1M vectors of dim 512 (clustered, like real embeddings; uniform random vectors have no
    neighbourhoods for any ANN index to exploit): the FAISS IVF index's recall@10 against
    exact search and its queries/s against exact search's.

    .venv/bin/python bench/bench_retrieval.py [--n 1000000]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def embedding_rate(n_images: int = 48) -> None:
    from mmcore import Index
    from common import best_rates, per_image_clip, photo_files, vit_b32

    model, image_processor, encoder = vit_b32()
    files = photo_files(n_images)

    best = best_rates({"loop": lambda: per_image_clip(model, image_processor, files),
                       "ours": lambda: Index(encoder).add(files)}, len(files))
    print(f"(a) embedding {len(files)} images, ViT-B/32: per-image loop {best['loop']:.1f}/s, "
          f"ours {best['ours']:.1f}/s, ratio {best['ours'] / best['loop']:.2f}x")


def exact_latency(n: int = 100_000, d: int = 512) -> None:
    from mmcore import Index

    class Fixed:                                   # an "encoder" for raw-vector queries
        identity, dim = "bench", d

    g = torch.Generator().manual_seed(0)
    index = Index(Fixed())
    vecs = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    index._append(vecs, [(str(i), "", str(i)) for i in range(n)])
    queries = torch.nn.functional.normalize(torch.randn(100, d, generator=g), dim=-1)
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(vector=q, k=10)
        times.append(time.perf_counter() - start)
    print(f"(b) exact search over {n:,} x {d}: median {statistics.median(times) * 1000:.2f} ms "
          f"per query")


def faiss_at_scale(n: int, d: int = 512, clusters: int = 10_000) -> None:
    from mmcore.index import build_faiss

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vecs = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):                       # in chunks: 2 GB at 1M
        m = min(100_000, n - start)
        chunk = centres[rng.integers(0, clusters, m)] + \
            0.5 * rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d)
        vecs[start:start + m] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    queries = vecs[rng.choice(n, 200, replace=False)] + \
        0.05 * rng.standard_normal((200, d)).astype(np.float32) / np.sqrt(d)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    start = time.perf_counter()
    index = build_faiss(vecs)
    built = time.perf_counter() - start
    t = torch.from_numpy(vecs)
    start = time.perf_counter()
    exact = [torch.from_numpy(q) @ t.T for q in queries[:50]]
    exact_ids = [e.topk(10).indices.numpy() for e in exact]
    exact_qps = 50 / (time.perf_counter() - start)
    start = time.perf_counter()
    for q in queries[:50]:
        index.search(q[None], 10)
    faiss_qps = 50 / (time.perf_counter() - start)
    _, found = index.search(queries[:50], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_ids, found)])
    print(f"(c) {n:,} x {d} vectors: IVF index built in {built:.0f} s (nlist {index.nlist}, "
          f"nprobe {index.nprobe}); recall@10 {recall:.3f}; one query at a time: exact "
          f"{exact_qps:.1f} q/s, FAISS {faiss_qps:.0f} q/s, ratio {faiss_qps / exact_qps:.0f}x")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    args = p.parse_args()
    embedding_rate()
    exact_latency()
    faiss_at_scale(args.n)


if __name__ == "__main__":
    main()
