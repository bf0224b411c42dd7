"""Zero-shot and image-encoding speed, side by side on a ViT-B/32-sized CLIPModel (random
weights cost the real compute), then the offline kit's images/s.

(1) Per-image latency, 100 labels x 8 templates: ours (label embeddings cached across images)
    against transformers' pipeline("zero-shot-image-classification"), called once per
    template as a user of the pipeline must for an ensemble.
(2) Images/s of batched `encode_images` against a per-image loop (PIL open, CLIPProcessor,
    model, batch 1).

    .venv/bin/python bench/bench_zero_shot.py
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_rates, per_image_clip, photo_files, vit_b32  # noqa: E402
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}.",
             "a bright photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
             "a good photo of a {}.", "a black and white photo of a {}.")


def main() -> None:
    from PIL import Image
    from transformers import pipeline

    import mmcore
    from mmcore import zero_shot as zs
    from timm.data import ImageNetInfo

    model, image_processor, encoder = vit_b32()
    tok = encoder.tokenizer
    pipe = pipeline("zero-shot-image-classification", model=model, tokenizer=tok,
                    image_processor=image_processor)
    labels = [d.split(",")[0] for d in ImageNetInfo().label_descriptions()[:100]]
    files = photo_files(32)

    # (1) per-image latency, 100 labels x 8 templates
    zs.zero_shot(encoder, files[0], labels, templates=TEMPLATES)       # fills the label cache
    ours, theirs = [], []
    for path in files[1:6]:
        start = time.perf_counter()
        zs.zero_shot(encoder, path, labels, templates=TEMPLATES)
        ours.append(time.perf_counter() - start)
    for path in files[1:3]:
        start = time.perf_counter()
        image = Image.open(path)
        for t in TEMPLATES:
            pipe(image, candidate_labels=labels, hypothesis_template=t)
        theirs.append(time.perf_counter() - start)
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"ViT-B/32 CLIP, 100 labels x 8 templates, {torch.get_num_threads()} threads")
    print(f"  per image: pipeline {t * 1000:8.0f} ms   ours {o * 1000:6.0f} ms   ratio {t / o:6.1f}x")

    # (2) images/s: batched encode_images vs a per-image processor + model loop
    best = best_rates({"loop": lambda: per_image_clip(model, image_processor, files),
                       "ours": lambda: encoder.encode_images(files)}, len(files))
    print(f"  encode {len(files)} images: per-image loop {best['loop']:5.1f} images/s   "
          f"ours batched {best['ours']:5.1f} images/s   ratio {best['ours'] / best['loop']:.2f}x")

    # (3) the offline kit
    kit = mmcore.load_kit("offline")
    kit.encode_images(files[:4])
    start = time.perf_counter()
    kit.encode_images(files)
    print(f"offline kit (ConSE) encode_images: {len(files) / (time.perf_counter() - start):.1f} images/s")


if __name__ == "__main__":
    main()
