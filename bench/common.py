"""Pieces the side-by-side benchmarks share: timing, a ViT-B/32 CLIP and its per-image
baseline, and sample photo files."""

import atexit
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def best_rates(fns: dict, count: int, rounds: int = 2) -> dict:
    """Best items/s of each no-argument function (each handles `count` items). A warm-up
    call first; rounds interleave the functions so machine noise hits all of them."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = max(best[name], count / (time.perf_counter() - start))
    return best


def per_image_clip(model, image_processor, files) -> None:
    """The baseline: PIL open, CLIPProcessor, model, one image at a time."""
    from PIL import Image

    with torch.inference_mode():
        for path in files:
            pixels = image_processor(images=Image.open(path).convert("RGB"),
                                     return_tensors="pt")["pixel_values"]
            model.get_image_features(pixel_values=pixels)


def photo_files(n: int) -> list:
    from PIL import Image
    from skimage import data

    folder = Path(tempfile.mkdtemp(prefix="mmcore-bench-"))
    atexit.register(shutil.rmtree, folder, True)              # gone when the run ends
    base = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    paths = []
    for i in range(n):
        arr = base[i % len(base)]
        crop = arr[(i * 7) % 40:, (i * 11) % 40:]
        path = folder / f"{i}.jpg"
        Image.fromarray(np.ascontiguousarray(crop)).save(path, quality=90)
        paths.append(str(path))
    return paths


def vit_b32():
    """(model, image processor, ClipEncoder) of a ViT-B/32-shaped CLIPModel, random weights
    (the real compute), with the tiny kit's tokenizer (ids fit CLIP's vocabulary)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    import mmcore
    from mmcore import dual_encoder as de

    tok = mmcore.load_kit("tiny").model("dual_encoder").tokenizer
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig()).eval()                      # ViT-B/32 shapes
    image_processor = CLIPImageProcessor()                      # 224 px, as ViT-B/32's

    class Processor:                                            # what ClipEncoder expects
        tokenizer = tok

        def __call__(self, images=None, **kw):
            return image_processor(images=images, **kw)

    return model, image_processor, de.ClipEncoder(model, Processor(), "bench-vit-b32")
