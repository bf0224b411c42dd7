"""A searchable index of image embeddings: build, add (only unseen content), remove, search
by text / image / vector with weighted and negative terms, save and load atomically.

Queries are typed: `search(text=..., image=..., vector=...)`. A string is always text; an
image is a PIL image, bytes, or a path given as `image=`; nothing is guessed from what exists
on disk. Each image keeps a small JPEG thumbnail, saved with the index, so whoever loads a
saved index sees its images without the index ever naming a file to open: ids and captions of
a loaded index are untrusted text.

Exact search is one matrix product; past FAISS_THRESHOLD vectors a FAISS inverted-file index
answers instead (its recall against exact search is measured in bench/bench_retrieval.py).

    python -m mmcore.index build FOLDER --out DIR [--kit offline]
    python -m mmcore.index search DIR "a cat on a sofa" "a dog" [-k 5] [--image PHOTO]
    python -m mmcore.index serve DIR [--port 8765]

(the command line, with its torchrun-sharded build, is in mmcore/index_cli.py; the HTTP back
end in mmcore/index_server.py)
"""

import concurrent.futures
import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from . import cache
from .errors import InputError
from .images import load_image
from .lanes import long_work
from .text import as_number, clean_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
FAISS_THRESHOLD = 50_000
FORMAT = "mmcore-index-1"
BATCH = 32
THUMBNAIL = 128               # longest side (px) of the JPEG kept per image; 0: none
MAX_ID = 1000                 # characters of an id or hash in a loaded index
MAX_CAPTION = 10_000


def _is_image(item) -> bool:
    from PIL import Image

    return isinstance(item, (Image.Image, bytes, bytearray))


def content_hash(image) -> str:
    h = hashlib.sha256()
    if isinstance(image, (bytes, bytearray)):
        h.update(image)
    elif isinstance(image, (str, Path)):
        with open(image, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    return h.hexdigest()


def image_files(folder) -> list:
    """Image files under a folder (recursively), sorted, hidden ones skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder.")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file() and not any(part.startswith(".") for part in p.parts))


class Index:
    def __init__(self, encoder, thumbnail_size: int = THUMBNAIL):
        self.encoder = encoder
        self.identity = encoder.identity
        self.vectors = torch.zeros(0, 0)
        self.ids: list = []
        self.captions: list = []
        self.hashes: list = []
        self.thumbnails: list = []          # JPEG bytes per image, b"" where there is none
        self.thumbnail_size = thumbnail_size
        self._faiss = None

    # ---------------------------------------------------------------- building
    @classmethod
    def build(cls, kit, images, captions=None, progress=None, stop_event=None,
              ids=None) -> "Index":
        index = cls(kit.encoder() if hasattr(kit, "encoder") else kit)
        index.add(images, captions, progress, stop_event, ids)
        return index

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, images, captions=None, progress=None, stop_event=None, ids=None) -> dict:
        """Embed images (paths, PIL images or bytes) not already in the index (by content).
        `ids`: how each is named in results (default: its path, or "image-N"); an id already
        taken gets a " (2)" suffix. Returns
        {"added": n, "duplicates": n, "errors": [(name, message)], "stopped": bool}."""
        images = list(images)
        captions = list(captions) if captions is not None else [""] * len(images)
        ids = list(ids) if ids is not None else [
            str(im) if isinstance(im, (str, Path)) else f"image-{len(self) + n}"
            for n, im in enumerate(images)]
        if not len(captions) == len(ids) == len(images):
            raise InputError(f"{len(images)} images, {len(captions)} captions, {len(ids)} ids.")
        report = {"added": 0, "duplicates": 0, "errors": [], "stopped": False}
        seen = set(self.hashes)
        taken = set(self.ids)
        todo = []
        for image, caption, name in zip(images, captions, ids):
            name = _unique(str(name), taken)
            try:
                digest = content_hash(image)
            except OSError as exc:
                report["errors"].append((name, f"unreadable ({exc.strerror or exc})"))
                continue
            if digest in seen:
                report["duplicates"] += 1
                continue
            seen.add(digest)
            taken.add(name)
            todo.append((name, image, caption, digest))
        # decode the next batch in threads while the model embeds this one
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            def decode(batch):
                return list(pool.map(lambda item: _try_load(item[1], self.thumbnail_size),
                                     batch))

            batches = [todo[i:i + BATCH] for i in range(0, len(todo), BATCH)]
            pending = pool.submit(decode, batches[0]) if batches else None
            for b, batch in enumerate(batches):
                if stop_event is not None and stop_event.is_set():
                    report["stopped"] = True
                    break
                loaded = pending.result()
                pending = pool.submit(decode, batches[b + 1]) if b + 1 < len(batches) else None
                good = [(item, im) for item, im in zip(batch, loaded) if not isinstance(im, str)]
                report["errors"] += [(item[0], im) for item, im in zip(batch, loaded)
                                     if isinstance(im, str)]
                if good:
                    with long_work():           # a scheduler keeps to its own threads
                        vecs = self.encoder.encode_images([im[0] for _, im in good])
                    self._append(vecs, [(item[0], item[2], item[3], im[1]) for item, im in good])
                    report["added"] += len(good)
                if progress is not None:
                    progress(min(len(todo), (b + 1) * BATCH), len(todo))
        return report

    def _append(self, vecs: torch.Tensor, rows: list) -> None:
        self.vectors = vecs if len(self) == 0 else torch.cat([self.vectors, vecs])
        for name, caption, digest, *thumb in rows:
            self.ids.append(name)
            self.captions.append(caption or "")
            self.hashes.append(digest)
            self.thumbnails.append(thumb[0] if thumb else b"")
        self._faiss = None

    def remove(self, ids) -> int:
        """Remove by id (the path) or position; returns how many were removed."""
        ids = [ids] if isinstance(ids, (str, int)) else list(ids)
        drop = set()
        for item in ids:
            if isinstance(item, int):
                if not 0 <= item < len(self):
                    raise InputError(f"No position {item} in an index of {len(self)}.")
                drop.add(item)
            elif str(item) in self.ids:
                drop.add(self.ids.index(str(item)))
            else:
                raise InputError(f"{item!r} is not in the index.")
        keep = [i for i in range(len(self)) if i not in drop]
        self.vectors = self.vectors[keep] if keep else torch.zeros(0, self.vectors.shape[-1])
        self.ids = [self.ids[i] for i in keep]
        self.captions = [self.captions[i] for i in keep]
        self.hashes = [self.hashes[i] for i in keep]
        self.thumbnails = [self.thumbnails[i] for i in keep]
        self._faiss = None
        return len(drop)

    # ---------------------------------------------------------------- searching
    def _text(self, text) -> torch.Tensor:
        if not isinstance(text, str):
            raise InputError(f"A text query must be a string, not {type(text).__name__}.")
        return self.encoder.encode_texts([clean_text(text, "Query", 2000).strip()])[0]

    def _image(self, image) -> torch.Tensor:
        if not (_is_image(image) or isinstance(image, (str, Path))):
            raise InputError("An image query must be a PIL image, bytes or a path, not "
                             f"{type(image).__name__} (pass k= by name).")
        return self.encoder.encode_images([image])[0]

    def _vector(self, vector) -> torch.Tensor:
        try:
            vec = torch.as_tensor(vector, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise InputError("A query vector must be a list or tensor of numbers.") from None
        if vec.numel() != self.vectors.shape[-1]:
            raise InputError(f"A query vector must have {self.vectors.shape[-1]} numbers, "
                             f"not {vec.numel()}.")
        if not torch.isfinite(vec).all():
            raise InputError("A query vector must hold finite numbers only.")
        return F.normalize(vec, dim=0)

    def _negative(self, term) -> torch.Tensor:
        """A negative term, typed by what it is: str is text; PIL or bytes an image; a tensor
        or array a vector (a path is never guessed: embed it yourself)."""
        if isinstance(term, str):
            return self._text(term)
        if _is_image(term):
            return self._image(term)
        if isinstance(term, (torch.Tensor, np.ndarray)):
            return self._vector(term)
        raise InputError(f"A negative term must be text, an image or a vector, not "
                         f"{type(term).__name__}.")

    def query_vector(self, text=None, image=None, vector=None, negative=None) -> torch.Tensor:
        """A unit vector: the weighted sum of the query terms minus the negative ones.
        Each argument is one term or a list of terms or (term, weight) pairs."""
        total = 0
        for value, embed in ((text, self._text), (image, self._image), (vector, self._vector)):
            for term, weight in _terms(value, vector=embed == self._vector):
                total = total + weight * embed(term)
        for term, weight in _terms(negative):
            total = total - weight * self._negative(term)
        if not isinstance(total, torch.Tensor) or float(total.norm()) == 0:
            raise InputError("The query is empty (or its terms cancel out).")
        return F.normalize(total, dim=0)

    def nearest(self, query: torch.Tensor, k: int = 10) -> list:
        """[(position, score)] of the k vectors nearest a unit query vector, best first."""
        if len(self) == 0:
            raise InputError("The index is empty.")
        k = min(int(as_number(k, "k", 1, 10**6, integer=True)), len(self))
        if len(self) >= FAISS_THRESHOLD:
            scores, idx = self.faiss().search(query.numpy()[None].astype(np.float32), k)
            return [(int(i), float(s)) for i, s in zip(idx[0], scores[0]) if i >= 0]
        top = (self.vectors @ query).topk(k)
        return list(zip(top.indices.tolist(), top.values.tolist()))

    def search(self, text=None, image=None, vector=None, k: int = 10, negative=None) -> list:
        """[(id, score)] best first; score is the cosine similarity to the query vector.
        text: str; image: PIL image, bytes or a path; vector: (D,) numbers; negative: terms
        to move away from. Each may also be a list of terms or (term, weight) pairs."""
        return [(r["id"], r["score"]) for r in self.results(text, image, vector, k, negative)]

    def results(self, text=None, image=None, vector=None, k: int = 10,
                negative=None) -> list:
        """`search` for programs: [{"id", "score", "caption", "position"}] best first
        (position: the row, e.g. for its thumbnail)."""
        if len(self) == 0:
            raise InputError("The index is empty.")
        from .lanes import PRIORITY

        with PRIORITY.short():            # a search goes before long work (generation)
            q = self.query_vector(text, image, vector, negative)
        return [{"id": self.ids[i], "score": s, "caption": self.captions[i], "position": i}
                for i, s in self.nearest(q, k)]

    def faiss(self, nprobe: int = 64):
        """An inverted-file FAISS index over the vectors (built on first use)."""
        if self._faiss is None:
            self._faiss = build_faiss(self.vectors.numpy().astype(np.float32), nprobe)
        return self._faiss

    # ---------------------------------------------------------------- evaluation
    def recall(self, ks=(1, 5, 10)) -> dict:
        """Image-to-text and text-to-image recall@k using the captions (one per image)."""
        rows = [i for i, c in enumerate(self.captions) if c]
        if len(rows) < 2:
            raise InputError("Recall needs at least two captioned images.")
        from .losses import recall_at_k

        texts = self.encoder.encode_texts([self.captions[i] for i in rows])
        return recall_at_k(self.vectors[rows], texts, ks)

    # ---------------------------------------------------------------- persistence
    def save(self, folder, overwrite: bool = False) -> Path:
        """vectors.safetensors + meta.json, written to a temp folder and renamed into place,
        so an interrupted save never corrupts an index already there. A folder of other
        files is refused unless `overwrite` (see cache.atomic_folder)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        with cache.atomic_folder(folder, FORMAT, overwrite=overwrite) as tmp:
            save_file({"vectors": self.vectors.contiguous(), **_pack(self.thumbnails)},
                      str(tmp / "vectors.safetensors"))
            (tmp / "meta.json").write_text(json.dumps({
                "format": FORMAT, "identity": self.identity, "ids": self.ids,
                "captions": self.captions, "hashes": self.hashes}))
        return folder

    @classmethod
    def load(cls, folder, kit) -> "Index":
        """A saved index. Its contents are checked as untrusted: lengths, types and sizes of
        ids and captions, finite vectors, thumbnail offsets; messages never name the folder."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not cache.is_complete(folder, FORMAT):
            raise InputError("This is not a complete mmcore index (missing or partial).")
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            tensors = load_file(str(folder / "vectors.safetensors"))
            vectors = tensors["vectors"]
        except Exception as exc:  # noqa: BLE001 - any damage is reported the same way
            raise InputError(f"The index is damaged ({type(exc).__name__}).") from None
        if not isinstance(meta, dict):
            raise InputError("The index is damaged (meta.json is not an object).")
        encoder = kit.encoder() if hasattr(kit, "encoder") else kit
        if meta.get("identity") != encoder.identity:
            theirs = str(meta.get("identity"))[:80]
            raise InputError(f"This index was built with another model ({theirs!r}). "
                             "Rebuild it with the model in use here.")
        ids, captions, hashes = (_strings(meta.get(key), limit) for key, limit in
                                 (("ids", MAX_ID), ("captions", MAX_CAPTION), ("hashes", MAX_ID)))
        n = len(ids)
        if vectors.ndim != 2 or vectors.shape[0] != n or len(captions) != n or len(hashes) != n:
            raise InputError("The index is damaged: its parts disagree in length.")
        # checked as searched: float32 (a float64 1e300 is finite, and inf as float32)
        vectors = vectors.float() if vectors.is_floating_point() else None
        if vectors is None or not torch.isfinite(vectors).all():
            raise InputError("The index is damaged: its vectors are not finite numbers.")
        dim = getattr(encoder, "dim", None)
        if n and dim and vectors.shape[1] != dim:
            raise InputError(f"The index is damaged: its vectors have {vectors.shape[1]} "
                             f"numbers each; this model's have {dim}.")
        if n and not torch.allclose(vectors.norm(dim=1), torch.ones(n), atol=1e-3):
            raise InputError("The index is damaged: its vectors are not of unit length "
                             "(their scores would not be cosine similarities).")
        index = cls(encoder)
        index.vectors, index.ids = vectors, ids
        index.captions, index.hashes = captions, hashes
        index.thumbnails = _unpack(tensors, n)
        return index

    def export(self, path) -> Path:
        """Embeddings plus metadata: .npz (arrays) or .csv (one row per image)."""
        from .tables import neutralise

        path = Path(path)
        if path.suffix == ".npz":
            np.savez(path, vectors=self.vectors.numpy(), ids=np.array(self.ids),
                     captions=np.array(self.captions), identity=np.array(self.identity))
        elif path.suffix == ".csv":
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["id", "caption", "vector"])
                for i, vec in enumerate(self.vectors.tolist()):
                    writer.writerow([neutralise(self.ids[i]), neutralise(self.captions[i]),
                                     " ".join(f"{v:.6f}" for v in vec)])
        else:
            raise InputError("Export to a .npz or .csv file.")
        return path


def _strings(value, limit: int) -> list:
    """A list of strings from an untrusted meta.json, each at most `limit` characters."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError("The index is damaged: ids, captions and hashes must be lists of text.")
    if any(len(v) > limit for v in value):
        raise InputError(f"The index is damaged: an entry is longer than {limit:,} characters.")
    return list(value)


def _pack(thumbnails: list) -> dict:
    """Thumbnails as two tensors: every JPEG end to end, and where each one starts."""
    offsets = np.cumsum([0] + [len(t) for t in thumbnails]).astype(np.int64)
    blob = np.frombuffer(b"".join(thumbnails), dtype=np.uint8).copy()
    return {"thumbnails": torch.from_numpy(blob), "thumbnail_offsets": torch.from_numpy(offsets)}


def _unpack(tensors: dict, n: int) -> list:
    """The thumbnails of a loaded index (none when absent; damage is reported). The bytes
    stay untrusted: whoever shows them decodes them with the safe image loader first."""
    if "thumbnails" not in tensors:
        return [b""] * n
    blob, offsets = tensors["thumbnails"], tensors.get("thumbnail_offsets")
    if offsets is None or offsets.ndim != 1 or len(offsets) != n + 1 or blob.ndim != 1 \
            or blob.dtype != torch.uint8:
        raise InputError("The index is damaged: its thumbnails do not match its images.")
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != len(blob) or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise InputError("The index is damaged: its thumbnail offsets are out of order.")
    raw = blob.numpy().tobytes()
    return [raw[a:b] for a, b in zip(bounds, bounds[1:])]


def _try_load(image, thumbnail_size: int = THUMBNAIL):
    """(PIL image, its JPEG thumbnail) or the error message."""
    try:
        im = load_image(image)
    except InputError as exc:
        return str(exc)
    return im, thumbnail(im, thumbnail_size)


def thumbnail(im, size: int = THUMBNAIL) -> bytes:
    """A small JPEG of an RGB image (b"" when size is 0)."""
    if not size:
        return b""
    small = im.copy()
    small.thumbnail((size, size))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def safe_thumbnail(raw: bytes, max_side: int = 1024) -> bytes | None:
    """A JPEG we encode ourselves from a stored thumbnail (a loaded index's bytes are
    untrusted: decoded by the safe loader, never served as they came); None when there is
    none or it is not a small image."""
    if not raw:
        return None
    try:
        with Image.open(io.BytesIO(raw)) as head:              # the header only
            if max(head.size) > max_side:
                return None                                      # no "thumbnail" bombs
        im = load_image(raw)
    except (InputError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    im.thumbnail((THUMBNAIL * 2, THUMBNAIL * 2))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _unique(name: str, taken: set) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name} ({n})" in taken:
        n += 1
    return f"{name} ({n})"


def _terms(value, vector: bool = False) -> list:
    """[(term, weight)] from None, one term, or a list of terms and (term, weight) pairs
    (for vectors, a flat list of numbers is one vector)."""
    if value is None:
        return []
    flat = vector and all(isinstance(x, (int, float)) for x in value) \
        if isinstance(value, list) else False
    items = value if isinstance(value, list) and not flat else [value]
    out = []
    for item in items:
        term, weight = item if isinstance(item, tuple) and len(item) == 2 and \
            isinstance(item[1], (int, float)) else (item, 1.0)
        out.append((term, float(as_number(weight, "A query weight", -100, 100))))
    return out


def build_faiss(vectors: np.ndarray, nprobe: int = 64):
    """IVF-flat, inner product, ~4 sqrt(N) lists, trained on up to 100k vectors."""
    import faiss

    n, d = vectors.shape
    nlist = max(1, min(int(4 * n ** 0.5), n // 39))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = vectors[np.random.default_rng(0).permutation(n)[:min(n, max(100_000, 40 * nlist))]]
    index.train(sample)
    index.add(vectors)
    index.nprobe = min(nprobe, nlist)
    return index


if __name__ == "__main__":            # python -m mmcore.index (the CLI lives in index_cli)
    from mmcore.index_cli import main

    raise SystemExit(main())
