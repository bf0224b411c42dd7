"""A searchable index of image embeddings: build, add (only unseen content), remove, search
by text / image / vector with weighted and negative terms, save and load atomically.

Exact search is one matrix product; past FAISS_THRESHOLD vectors a FAISS inverted-file index
answers instead (its recall against exact search is measured in bench/bench_retrieval.py).

    python -m mmcore.index build FOLDER --out DIR [--kit offline]
    python -m mmcore.index search DIR "a cat on a sofa" [-k 5]

Under `torchrun --nproc_per_node N` (or `accelerate launch`) the build embeds 1/N of the files
in each process and rank 0 merges the shards; the result equals a one-process build.
"""

import concurrent.futures
import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from . import cache
from .errors import InputError
from .images import load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
FAISS_THRESHOLD = 50_000
FORMAT = "mmcore-index-1"
BATCH = 32


def content_hash(image) -> str:
    h = hashlib.sha256()
    if isinstance(image, (str, Path)):
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
    def __init__(self, encoder):
        self.encoder = encoder
        self.identity = encoder.identity
        self.vectors = torch.zeros(0, 0)
        self.ids: list = []
        self.captions: list = []
        self.hashes: list = []
        self._faiss = None

    # ---------------------------------------------------------------- building
    @classmethod
    def build(cls, kit, images, captions=None, progress=None, stop_event=None) -> "Index":
        index = cls(kit.encoder() if hasattr(kit, "encoder") else kit)
        index.add(images, captions, progress, stop_event)
        return index

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, images, captions=None, progress=None, stop_event=None) -> dict:
        """Embed images not already in the index (by content). Returns
        {"added": n, "duplicates": n, "errors": [(name, message)], "stopped": bool}."""
        images = list(images)
        captions = list(captions) if captions is not None else [""] * len(images)
        if len(captions) != len(images):
            raise InputError(f"{len(images)} images but {len(captions)} captions.")
        report = {"added": 0, "duplicates": 0, "errors": [], "stopped": False}
        seen = set(self.hashes)
        todo = []
        for n, (image, caption) in enumerate(zip(images, captions)):
            name = str(image) if isinstance(image, (str, Path)) else f"image-{len(self) + n}"
            try:
                digest = content_hash(image)
            except OSError as exc:
                report["errors"].append((name, f"unreadable ({exc.strerror or exc})"))
                continue
            if digest in seen:
                report["duplicates"] += 1
                continue
            seen.add(digest)
            todo.append((name, image, caption, digest))
        # decode the next batch in threads while the model embeds this one
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            def decode(batch):
                return list(pool.map(lambda item: _try_load(item[1]), batch))

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
                    vecs = self.encoder.encode_images([im for _, im in good])
                    self._append(vecs, [(item[0], item[2], item[3]) for item, _ in good])
                    report["added"] += len(good)
                if progress is not None:
                    progress(min(len(todo), (b + 1) * BATCH), len(todo))
        return report

    def _append(self, vecs: torch.Tensor, rows: list) -> None:
        self.vectors = vecs if len(self) == 0 else torch.cat([self.vectors, vecs])
        for name, caption, digest in rows:
            self.ids.append(name)
            self.captions.append(caption or "")
            self.hashes.append(digest)
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
        self._faiss = None
        return len(drop)

    # ---------------------------------------------------------------- searching
    def _embed(self, item) -> torch.Tensor:
        if isinstance(item, torch.Tensor) or isinstance(item, np.ndarray) and item.ndim == 1:
            vec = torch.as_tensor(item, dtype=torch.float32).flatten()
            if vec.numel() != self.vectors.shape[-1]:
                raise InputError(f"A query vector must have {self.vectors.shape[-1]} numbers, "
                                 f"not {vec.numel()}.")
            return F.normalize(vec, dim=0)
        if isinstance(item, str) and not (Path(item).suffix.lower() in IMAGE_SUFFIXES
                                          and Path(item).is_file()):
            from .text import clean_text

            return self.encoder.encode_texts([clean_text(item, "Query", 2000).strip()])[0]
        return self.encoder.encode_images([item])[0]

    def query_vector(self, query, negative=None) -> torch.Tensor:
        """A unit vector: the weighted sum of the query terms minus the negative ones.
        query: text, image (PIL or path), vector, or a list of (term, weight)."""
        terms = query if isinstance(query, list) else [(query, 1.0)]
        negs = negative if isinstance(negative, list) else ([negative] if negative else [])
        total = 0
        for item in terms:
            term, weight = item if isinstance(item, tuple) else (item, 1.0)
            total = total + float(weight) * self._embed(term)
        for item in negs:
            term, weight = item if isinstance(item, tuple) else (item, 1.0)
            total = total - float(weight) * self._embed(term)
        if not isinstance(total, torch.Tensor) or float(total.norm()) == 0:
            raise InputError("The query is empty (or its terms cancel out).")
        return F.normalize(total, dim=0)

    def search(self, query, k: int = 10, negative=None) -> list:
        """[(id, score)] best first; score is the cosine similarity to the query vector."""
        if len(self) == 0:
            raise InputError("The index is empty.")
        k = max(1, min(int(k), len(self)))
        q = self.query_vector(query, negative)
        if len(self) >= FAISS_THRESHOLD:
            scores, idx = self.faiss().search(q.numpy()[None].astype(np.float32), k)
            pairs = [(int(i), float(s)) for i, s in zip(idx[0], scores[0]) if i >= 0]
        else:
            scores = self.vectors @ q
            top = scores.topk(k)
            pairs = list(zip(top.indices.tolist(), top.values.tolist()))
        return [(self.ids[i], s) for i, s in pairs]

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
            save_file({"vectors": self.vectors.contiguous()}, str(tmp / "vectors.safetensors"))
            (tmp / "meta.json").write_text(json.dumps({
                "format": FORMAT, "identity": self.identity, "ids": self.ids,
                "captions": self.captions, "hashes": self.hashes}))
        return folder

    @classmethod
    def load(cls, folder, kit) -> "Index":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not cache.is_complete(folder, FORMAT):
            raise InputError(f"{folder} is not a complete mmcore index (missing or partial).")
        try:
            meta = json.loads((folder / "meta.json").read_text())
            vectors = load_file(str(folder / "vectors.safetensors"))["vectors"]
        except Exception as exc:  # noqa: BLE001 - any damage is reported the same way
            raise InputError(f"{folder} is damaged: {type(exc).__name__}.") from None
        encoder = kit.encoder() if hasattr(kit, "encoder") else kit
        if meta.get("identity") != encoder.identity:
            raise InputError(f"This index was built with {meta.get('identity')!r}; the current "
                             f"model is {encoder.identity!r}. Rebuild it with this model.")
        n = len(meta.get("ids", []))
        if vectors.ndim != 2 or vectors.shape[0] != n or len(meta.get("captions", [])) != n \
                or len(meta.get("hashes", [])) != n:
            raise InputError(f"{folder} is damaged: its parts disagree in length.")
        index = cls(encoder)
        index.vectors, index.ids = vectors.float(), list(meta["ids"])
        index.captions, index.hashes = list(meta["captions"]), list(meta["hashes"])
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


def _try_load(image):
    try:
        return load_image(image)
    except InputError as exc:
        return str(exc)


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


# ---------------------------------------------------------------- command line

def _distributed():
    """(rank, world) under torchrun / accelerate launch, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def build_folder(kit, folder, out, captions_csv=None, overwrite: bool = False) -> Index | None:
    """Build an index of every image under `folder`; sharded across processes when launched
    by torchrun (rank r embeds files r, r+N, ...); rank 0 merges and saves."""
    cache.check_target(out, overwrite)          # refuse before the work, not after it
    files = image_files(folder)
    captions = {}
    if captions_csv:
        from .tables import read_csv

        rows, _ = read_csv(captions_csv, ["image", "caption"], max_rows=10**6)
        captions = {r["image"]: r["caption"] for r in rows}
    rank, world = _distributed()
    mine = files[rank::world]
    index = Index.build(kit, mine, [captions.get(p.name, "") for p in mine])
    if world == 1:
        index.save(out, overwrite)
        return index
    shard = Path(out).with_name(Path(out).name + f".shard{rank}")
    index.save(shard)
    torch.distributed.barrier()
    merged = None
    if rank == 0:
        merged = Index(index.encoder)
        parts = [Index.load(Path(out).with_name(Path(out).name + f".shard{r}"), kit)
                 for r in range(world)]
        order = {str(p): i for i, p in enumerate(files)}
        rows = sorted(((order.get(pid, len(order)), part, i) for part in parts
                       for i, pid in enumerate(part.ids)), key=lambda x: x[0])
        merged.vectors = torch.stack([part.vectors[i] for _, part, i in rows])
        merged.ids = [part.ids[i] for _, part, i in rows]
        merged.captions = [part.captions[i] for _, part, i in rows]
        merged.hashes = [part.hashes[i] for _, part, i in rows]
        merged.save(out, overwrite)
        for r in range(world):
            cache.remove(Path(out).with_name(Path(out).name + f".shard{r}"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return merged


def main(argv=None) -> int:
    import argparse

    from . import load_kit

    p = argparse.ArgumentParser(prog="python -m mmcore.index")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="index every image under a folder")
    b.add_argument("folder")
    b.add_argument("--out", required=True)
    b.add_argument("--captions", help="CSV with columns image, caption (file names)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds files mmcore did not write")
    s = sub.add_parser("search", help="search a saved index")
    s.add_argument("index")
    s.add_argument("query")
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--negative")
    for sp in (b, s):
        sp.add_argument("--kit", default=os.environ.get("MMCORE_KIT", "offline"))
    args = p.parse_args(argv)
    kit = load_kit(args.kit)
    try:
        if args.command == "build":
            index = build_folder(kit, args.folder, args.out, args.captions, args.overwrite)
            if index is not None:
                print(f"indexed {len(index)} images into {args.out}")
        else:
            index = Index.load(args.index, kit)
            for pid, score in index.search(args.query, args.k, args.negative):
                print(f"{score:.4f}  {pid}")
    except InputError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
