"""GPU figures in one prepared command (for a lent GPU machine; needs torch, transformers,
accelerate, no gradio, no network):

    python bench/gpu_bench.py [--quick]

1. Generation, batch 1 and 8 streams: a GPT-2-124M-shaped model (random weights: speed does
   not depend on their values) served by mmcore (`kit.generate`, and the serving scheduler
   with 8 concurrent streams) beside `model.generate` of transformers, same model, same GPU.
2. CLIP ViT-B/32 contrastive training step (mmcore.losses.clip_loss, bf16 autocast as
   mmcore.device picks it, fused AdamW): samples/s and MFU (model FLOPs from torch's
   FlopCounterMode over the GPU's dense bf16 peak), eager and torch.compile.
Prints the GPU, its bf16 support and the versions first, so a number can be read elsewhere.
"""

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 125e12, "A10": 125e12, "T4": 65e12}       # dense tensor-core FLOP/s


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_flops(name: str):
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def gpt2_folder() -> str:
    """A GPT-2-124M-shaped checkpoint (random weights) with the tiny kit's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from mmcore import tiny

    folder = Path(tempfile.mkdtemp(prefix="gpu-bench-gpt2-"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(tiny.folder("gpt2"))
    # GPT-2's vocabulary size (50257, the LM head's real cost) needs a tokenizer that big:
    # pad the tiny one with unused tokens (the honest load check wants >= half the vocab)
    tok.add_tokens([f"<unused{i}>" for i in range(GPT2Config().vocab_size - len(tok))])
    tok.save_pretrained(folder)
    return str(folder)


def bench_generation(tokens: int) -> None:
    import mmcore

    kit = mmcore.load_kit("tiny", causal_lm=gpt2_folder(), precision="exact")
    prompt = "The capital of France is"
    kit.generate(prompt, max_new_tokens=8)                                 # load + warm up
    model = kit.model("causal_lm")
    hf_model = getattr(model, "model", None) or model.parts["model"]
    tok = getattr(model, "tokenizer", None) or model.parts["processor"]
    ids = tok(prompt, return_tensors="pt").input_ids.to(hf_model.device)

    def ours():
        kit.generate(prompt, max_new_tokens=tokens)

    def reference():
        hf_model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                          pad_token_id=tok.eos_token_id or 0)

    for name, fn in (("transformers generate", reference), ("mmcore kit.generate", ours)):
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        print(f"  batch 1, {tokens} tokens, {name:22s} {tokens / (time.perf_counter() - start):7.1f} tok/s")
    kit.serve()
    kit.generate(prompt, max_new_tokens=8)
    counts = []

    def stream():
        counts.append(len(list(kit.stream(prompt, max_new_tokens=tokens))))

    threads = [threading.Thread(target=stream) for _ in range(8)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    print(f"  8 streams through the scheduler: {8 * tokens / seconds:7.1f} tok/s in all "
          f"({seconds:.2f} s for {8 * tokens} tokens)")
    kit.stop_serving()


def bench_clip_training(batch: int, steps: int, compile_too: bool) -> None:
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPConfig, CLIPModel

    from mmcore import losses
    from mmcore.device import autocast, autocast_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig()).to(device).train()                    # ViT-B/32 shape
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    pixels = torch.randn(batch, 3, 224, 224, device=device)
    text = torch.randint(0, 49408, (batch, 77), device=device)
    print(f"  autocast dtype {autocast_dtype(device)}, batch {batch}")

    def step(m):
        with autocast(device):
            out = m(input_ids=text, pixel_values=pixels)
            loss = losses.clip_loss(out.image_embeds, out.text_embeds,
                                    losses.logit_scale(model.logit_scale))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.clamp_log_scale_(model.logit_scale)

    with FlopCounterMode(display=False) as counter:
        step(model)
    flops = counter.get_total_flops()
    peak = peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    runs = [("eager", model)]
    if compile_too:
        runs.append(("torch.compile", torch.compile(model)))
    for name, m in runs:
        start = time.perf_counter()
        for _ in range(3):
            step(m)                                            # warm-up (and compile)
        sync()
        warm = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            step(m)
        sync()
        per_step = (time.perf_counter() - start) / steps
        achieved = flops / per_step
        mfu = f"{100 * achieved / peak:5.1f}% MFU" if peak else "MFU n/a (unknown GPU peak)"
        print(f"  {name:14s} {batch / per_step:8.0f} samples/s  {achieved / 1e12:6.1f} "
              f"TFLOP/s  {mfu}  (warm-up {warm:.0f} s; {flops / 1e12:.2f} TFLOP per step)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer tokens and steps, no compile")
    p.add_argument("--smoke", action="store_true", help="a CPU check of this script only")
    args = p.parse_args(argv)
    if args.smoke:
        bench_generation(4)
        bench_clip_training(2, 1, compile_too=False)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device here; nothing to measure")
        return 1
    import transformers

    name = torch.cuda.get_device_name()
    print(f"GPU {name}, capability {torch.cuda.get_device_capability()}, bf16 "
          f"{torch.cuda.is_bf16_supported()}, peak bf16 {peak_flops(name)}; torch "
          f"{torch.__version__}, transformers {transformers.__version__}")
    torch.backends.cuda.matmul.allow_tf32 = True
    print("generation (GPT-2 124M shape):")
    bench_generation(32 if args.quick else 128)
    print("CLIP ViT-B/32 training step:")
    bench_clip_training(256, 5 if args.quick else 20, compile_too=not args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
