"""One safe image loader for every tab: caps before decoding, known formats only, every
mode made RGB the same way, EXIF orientation applied, bad files reported and skipped.
"""

import io
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
MAX_PIXELS = 40_000_000          # far below Pillow's warning (89 Mpx) and bomb (179 Mpx) levels
MAX_ASPECT = 50                  # resizing a 1 x 100000 strip to 224 px would explode it
MAX_BYTES = 50 * 1024 * 1024
# `warnings.catch_warnings` swaps the process's one filter list: images load on several
# threads at once (dual_encoder.decode_all), and unguarded, one thread restored a list that
# held another's "ignore" filter, silencing every warning in the process
_QUIET = threading.Lock()


def _name(src) -> str:
    return Path(src).name if isinstance(src, (str, Path)) else type(src).__name__


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to RGB: transparency over white (not black); 16/32-bit and float rescaled
    to 8 bits by their range (a plain convert clips them to white); CMYK, P, 1, L, LA..."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            a = a / 65535.0
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        im = Image.fromarray((a * 255).round().clip(0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(src) -> Image.Image:
    """A checked RGB PIL image from a PIL image, a path or bytes; InputError otherwise."""
    name = _name(src)
    if isinstance(src, Image.Image):
        im = src
    else:
        try:
            if isinstance(src, (bytes, bytearray)):
                if len(src) > MAX_BYTES:
                    raise InputError(f"Image is {len(src):,} bytes; the limit is {MAX_BYTES:,}.")
                fp = io.BytesIO(src)
            else:
                path = Path(src)
                if not path.is_file():
                    raise InputError(f"{name}: no such file.")
                if path.stat().st_size > MAX_BYTES:
                    raise InputError(f"{name} is {path.stat().st_size:,} bytes; the limit is "
                                     f"{MAX_BYTES:,}.")
                fp = path
            with _QUIET, warnings.catch_warnings():       # our own cap applies below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(fp, formats=FORMATS)      # reads the header only
        except InputError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise InputError(f"{name} is not an image in a supported format "
                             f"({', '.join(FORMATS)}).") from None
        except Image.DecompressionBombError:
            raise InputError(f"{name} declares too many pixels.") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise InputError(f"{name} is {w} x {h} pixels: empty.")
    if w * h > MAX_PIXELS:
        raise InputError(f"{name} is {w} x {h} = {w * h:,} pixels; the limit is {MAX_PIXELS:,}.")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise InputError(f"{name} is {w} x {h} pixels: too thin (aspect ratio over {MAX_ASPECT}:1).")
    try:
        if getattr(im, "is_animated", False):
            im.seek(0)                                    # first frame
        im.load()                                         # truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"{name} is truncated or corrupt ({type(exc).__name__}).") from None
    return to_rgb(upright(im))


def upright(im: Image.Image) -> Image.Image:
    """EXIF orientation applied once. Unreadable EXIF counts as no orientation (the pixels are
    fine), and the result carries no EXIF, so a second pass (a loaded image handed back to
    this loader) changes nothing and cannot fail."""
    try:
        with _QUIET, warnings.catch_warnings():
            warnings.simplefilter("ignore")              # "Corrupt EXIF data"
            im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - any EXIF parser error: keep the pixels as they are
        pass
    if "exif" in im.info:
        im = im.copy()
        im.info.pop("exif", None)
    return im


def load_images(sources) -> tuple:
    """(images, errors): every source that loads, and (name, message) for each that does not."""
    images, errors = [], []
    for src in sources:
        try:
            images.append(load_image(src))
        except InputError as exc:
            errors.append((_name(src), str(exc)))
    return images, errors
