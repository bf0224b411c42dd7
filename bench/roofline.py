"""The roofs a figure is read against, measured on this machine in the same run.

- memory: read bandwidth (a large tensor summed; decode reads every weight once per token,
  so tokens/s x bytes per token over it is the fraction of the memory roof reached);
- compute: a large GEMM's FLOP/s in fp32 and bf16 (image towers are compute-bound);
- the CPU: vendor, ISA, bf16 / VNNI / AMX and threads, so a number from another machine
  can be read.
"""

import time

import torch


def header(threads: int | None = None) -> str:
    """Set torch's threads (if given) and return the capability line to print first."""
    from mmcore.precision import capability, onednn_fp32_pays

    if threads:
        torch.set_num_threads(threads)
    gemm = "oneDNN (MKL's fp32 path is slow on this CPU)" if onednn_fp32_pays() else "MKL"
    return f"{capability().line()}; mmcore's exact fp32 linears: {gemm}"


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes read per second: best of `repeats` sums over a tensor far larger than cache."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start))
    return best


def gemm_flops(dtype=torch.float32, n: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (best of `repeats`)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def bytes_per_token(model) -> int:
    """Weight bytes a decode step reads: every parameter and buffer once, except an input
    embedding table that is not also the output head (a step reads one row of it)."""
    from mmcore.precision import weight_bytes

    total = weight_bytes(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not (isinstance(head, torch.nn.Linear) and head.weight is emb.weight):
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def flops_of(fn) -> int:
    """FLOPs of one call of `fn` (torch's counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
