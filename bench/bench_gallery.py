"""Gallery embedding: batch size, memory format and dtype per image tower, side by side.

For (1) a ViT-B/32-shaped CLIPModel (random weights: the real compute) and (2) the offline
kit's EfficientNet-Lite0 ConSE tower, in one run and interleaved: the per-image fp32 loop
(the reference), then mmcore's `encode_images` at each batch size x layout x dtype. Prints
images/s, the ratio to the loop, the fraction of the compute roof (a GEMM's FLOP/s in the
same dtype) and the CPU's capability; the best setting per tower is what
`precision.IMAGE_BATCH` should hold. The offline tower also runs each setting "folded"
(its norms folded into its convs: `precision.folded_twin`, what `fast` runs).

    .venv/bin/python bench/bench_gallery.py [--images 32] [--threads 2] [--rounds 2]
"""

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def variants(encoder, module_attr: str, batches, layouts, fold: bool = False):
    """{label: (encoder copy, batch)}: fp32 and (where native) bf16, each layout; with
    `fold`, each also with the tower's norms folded into its convs (what `fast` runs)."""
    from mmcore.precision import capability, folded_twin

    dtypes = [torch.float32] + ([torch.bfloat16] if capability().bf16 else [])
    out = {}
    for dtype in dtypes:
        for layout in layouts:
            for folded in (False, True) if fold else (False,):
                enc = copy.copy(encoder)
                if isinstance(enc, torch.nn.Module):    # its own module table, not the shared one
                    enc._modules = dict(encoder._modules)
                module = copy.deepcopy(getattr(encoder, module_attr))
                twin = folded_twin(module) if folded else None
                for m in (module, twin):
                    if m is not None:
                        m.to(dtype=dtype, memory_format=layout)
                setattr(enc, module_attr, module)
                if folded:
                    enc.set_serving_image_model(twin)
                for b in batches:
                    name = "cl" if layout == torch.channels_last else "nchw"
                    out[f"{str(dtype)[6:]} {name} b{b}" + (" folded" if folded else "")] = \
                        (enc, b)
    return out


def run_tower(title, loop, encoder, module_attr, files, batches, layouts, flops_per_image,
              roofs, rounds, fold=False):
    from common import best_rates

    fns = {"per-image fp32 loop": loop}
    for label, (enc, b) in variants(encoder, module_attr, batches, layouts, fold).items():
        def ours(enc=enc, b=b):
            enc.image_batch = b
            enc.encode_images(files)
        fns[label] = ours
    rates = best_rates(fns, len(files), rounds)
    base = rates["per-image fp32 loop"]
    print(f"{title}: {len(files)} images, {flops_per_image / 1e9:.2f} GFLOP per image")
    for label, rate in rates.items():
        roof = roofs["bfloat16" if label.startswith("bfloat16") else "float32"]
        print(f"  {label:22s} {rate:7.1f} images/s  {rate / base:5.2f}x  "
              f"{rate * flops_per_image / roof:5.1%} of the {roof / 1e9:.0f} GFLOP/s roof")
    best = max((r, k) for k, r in rates.items() if k != "per-image fp32 loop")
    print(f"  best: {best[1]} ({best[0] / base:.2f}x the loop)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip-vit", action="store_true")
    args = p.parse_args()

    import roofline
    from common import per_image_clip, photo_files, vit_b32

    print(roofline.header(args.threads))
    roofs = {"float32": roofline.gemm_flops(torch.float32)}
    roofs["bfloat16"] = roofline.gemm_flops(torch.bfloat16)
    print(f"compute roof (1024^3 GEMM): fp32 {roofs['float32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {roofs['bfloat16'] / 1e9:.0f} GFLOP/s")
    files = photo_files(args.images)

    if not args.skip_vit:
        model, image_processor, encoder = vit_b32()
        pixels = torch.randn(1, 3, 224, 224)
        flops = roofline.flops_of(lambda: model.get_image_features(pixel_values=pixels))
        run_tower("(1) ViT-B/32 image tower",
                  lambda: per_image_clip(model, image_processor, files), encoder, "model",
                  files, (8, 16, 32), (torch.contiguous_format,), flops, roofs, args.rounds)

    import mmcore

    tower = mmcore.load_kit("offline", precision="exact").encoder()

    def loop():                         # one photo per call: decoded, then its forward
        for path in files:
            tower.encode_images([path])

    pixels = torch.randn(1, 3, 224, 224)
    flops = roofline.flops_of(lambda: tower.image_model(pixels))
    run_tower("(2) offline tower (EfficientNet-Lite0 + ConSE)", loop, tower, "image_model",
              files, (4, 8, 16, 32), (torch.contiguous_format, torch.channels_last), flops,
              roofs, args.rounds, fold=True)


if __name__ == "__main__":
    main()
