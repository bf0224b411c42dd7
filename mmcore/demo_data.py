"""A small captioned demo set for fine-tuning, made on the spot: drawings of coloured shapes
(colour x shape x size x side: 64 unique captions) plus the packaged scikit-image photos with
captions we wrote."""

import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 220),
           "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
PHOTOS = {"astronaut": "an astronaut in a white suit in front of a flag",
          "chelsea": "a tabby cat looking to the side", "coffee": "a cup of coffee on a saucer",
          "rocket": "a rocket standing on its launch pad", "camera": "a man holding a camera",
          "clock": "a clock hanging on a wall", "page": "a printed page of text",
          "coins": "old coins on a dark background"}


def draw(colour: str, shape: str, size: str, side: str) -> Image.Image:
    im = Image.new("RGB", (224, 224), "white")
    d = ImageDraw.Draw(im)
    rgb, r = COLOURS[colour], (30 if size == "small" else 70)
    cx, cy = (70 if side == "left" else 154), 112
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=rgb)
    elif shape == "square":
        d.rectangle(box, fill=rgb)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    else:
        d.rectangle((cx - r, cy - r // 4, cx + r, cy + r // 4), fill=rgb)
        d.rectangle((cx - r // 4, cy - r, cx + r // 4, cy + r), fill=rgb)
    return im


def photo_files(folder, names) -> list:
    """The named scikit-image sample photos as PNG files in `folder`, written once
    (boolean images such as the horse silhouette become black and white)."""
    from skimage import data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.png"
        if not path.exists():
            arr = np.asarray(getattr(data, name)())
            # written under a temp name and renamed: a concurrent reader never sees half a file
            tmp = folder / f".tmp-{os.getpid()}-{threading.get_ident()}-{name}.png"
            Image.fromarray(arr.astype(np.uint8) * 255 if arr.dtype == bool else arr).save(tmp)
            os.replace(tmp, path)
        paths.append(path)
    return paths


def make(folder, photos: bool = True) -> Path:
    """Write the demo set (images + captions.csv) into `folder`; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"]
    for colour in COLOURS:
        for shape in SHAPES:
            for size in ("small", "large"):
                for side in ("left", "right"):
                    name = f"{colour}-{shape}-{size}-{side}.png"
                    if not (folder / name).exists():
                        draw(colour, shape, size, side).save(folder / name)
                    rows.append(f"{name},a {size} {colour} {shape} on the {side}")
    if photos:
        for path, caption in zip(photo_files(folder, PHOTOS), PHOTOS.values()):
            rows.append(f"{path.name},{caption}")
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder
