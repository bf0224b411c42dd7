"""Image-caption training data: a folder or .zip holding images plus captions.csv,
captions.jsonl (fields image, caption) or sidecar .txt files (cat.jpg + cat.txt).

`load_pairs` returns the usable pairs and a validation report of everything else: caption
rows whose image is missing, images without a caption, unreadable images, empty and duplicate
captions, and the text encodings met. `split` makes a seeded train/validation split.
"""

import json
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import archives, tables
from .errors import InputError
from .images import load_image
from .index import IMAGE_SUFFIXES

MAX_PAIRS = 20_000


@dataclass
class Pair:
    image: Path
    caption: str
    # the temp folder a .zip was extracted into: removed when no pair of it is left
    _folder: object = field(default=None, repr=False, compare=False)


@dataclass
class DataReport:
    pairs: list = field(default_factory=list)              # usable Pair objects
    missing_images: list = field(default_factory=list)     # caption rows naming absent files
    uncaptioned: list = field(default_factory=list)        # images with no caption
    unreadable: list = field(default_factory=list)         # (name, why)
    empty_captions: list = field(default_factory=list)     # image names
    duplicate_captions: list = field(default_factory=list) # captions used by several images
    notices: list = field(default_factory=list)            # encodings, skipped archive entries

    def summary(self) -> str:
        lines = [f"{len(self.pairs)} usable image-caption pairs."]
        for label, items in (("caption rows whose image is missing", self.missing_images),
                             ("images without a caption", self.uncaptioned),
                             ("unreadable images", [n for n, _ in self.unreadable]),
                             ("empty captions", self.empty_captions),
                             ("captions shared by several images", self.duplicate_captions)):
            if items:
                shown = ", ".join(str(i) for i in items[:10])
                lines.append(f"- {len(items)} {label}: {shown}{' …' if len(items) > 10 else ''}")
        return "\n".join(lines + [f"- {n}" for n in self.notices])


def _captions(folder: Path, images: dict, report: DataReport) -> dict:
    """{image name (relative, posix): caption} from whichever caption source is present."""
    csvs = sorted(folder.rglob("captions.csv"))
    jsonls = sorted(folder.rglob("captions.jsonl"))
    if csvs:
        rows, notices = tables.read_csv(csvs[0], ["image", "caption"], max_rows=MAX_PAIRS)
        report.notices += notices
        base = csvs[0].parent
        return {_relative(base / r["image"].strip(), folder): r["caption"] for r in rows}
    if jsonls:
        text, encoding = tables.decode_bytes(jsonls[0].read_bytes())
        if not encoding.startswith("UTF-8"):
            report.notices.append(f"Read {jsonls[0].name} as {encoding}.")
        out = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            caption = row.get("caption", "") if isinstance(row, dict) else None
            if isinstance(row, dict) and isinstance(row.get("image"), str) and \
                    isinstance(caption, (str, int, float)) and not isinstance(caption, bool):
                out[_relative(jsonls[0].parent / row["image"].strip(), folder)] = str(caption)
            else:
                report.notices.append(f"captions.jsonl line {n} is not an object with "
                                      "'image' and 'caption'; skipped.")
        return out
    out = {}
    for name, path in images.items():
        sidecar = path.with_suffix(".txt")
        if sidecar.exists():
            out[name] = tables.decode_bytes(sidecar.read_bytes())[0]
    return out


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return "../" + path.name            # points outside the data: never matches an image


def load_pairs(data, check_images: bool = True, stop_event=None,
               require: bool = True) -> DataReport:
    """Read a folder or .zip of images and captions; nothing bad is fatal except no pairs
    (with `require=False`, not even that: the report says so).
    `stop_event` (set by a cancelled request) ends the image checks early: InputError."""
    report = DataReport()
    data = Path(data)
    holder = None
    if data.suffix.lower() == ".zip":
        holder = tempfile.TemporaryDirectory(prefix="mmcore-zip-")
        folder, _, skipped = archives.safe_extract(
            data, tuple(IMAGE_SUFFIXES) + (".csv", ".jsonl", ".txt"), holder.name)
        report.notices += [f"skipped {n} in the archive: {why}" for n, why in skipped[:50]]
    elif data.is_dir():
        folder = data
    else:
        raise InputError(f"{data.name}: give a folder or a .zip file.")
    images = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
              if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
              and not any(part.startswith((".", "__MACOSX")) for part in
                          p.relative_to(folder).parts)}
    captions = _captions(folder, images, report)
    report.missing_images = sorted(n for n in captions if n not in images)
    report.uncaptioned = sorted(n for n in images if n not in captions)
    seen: dict = {}
    for name, path in images.items():
        if name not in captions:
            continue
        caption = " ".join(captions[name].replace("\x00", "").split())
        if not caption:
            report.empty_captions.append(name)
            continue
        if check_images:
            if stop_event is not None and stop_event.is_set():
                raise InputError("Stopped.")
            try:
                load_image(path)
            except InputError as exc:
                report.unreadable.append((name, str(exc)))
                continue
        seen.setdefault(caption.lower(), []).append(name)
        report.pairs.append(Pair(path, caption, holder))
    report.duplicate_captions = sorted(c for c, names in seen.items() if len(names) > 1)
    if len(report.pairs) > MAX_PAIRS:
        report.notices.append(f"{len(report.pairs)} pairs; only the first {MAX_PAIRS} are used.")
        report.pairs = report.pairs[:MAX_PAIRS]
    if not report.pairs and require:
        raise InputError("No usable image-caption pairs.\n" + report.summary())
    return report


def split(pairs: list, val_fraction: float = 0.2, seed: int = 0) -> tuple:
    """(train, validation): a seeded shuffle, at least one pair on each side when possible."""
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction must be in [0, 1), not {val_fraction}.")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(pairs) - 1, max(1, round(len(pairs) * val_fraction))) if val_fraction else 0
    val = [pairs[i] for i in sorted(order[:n_val])]
    train = [pairs[i] for i in sorted(order[n_val:])]
    return train, val
