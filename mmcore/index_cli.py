"""The retrieval index's command line (`python -m mmcore.index`, kept there for users):

    python -m mmcore.index build FOLDER --out DIR [--kit offline] [--captions CSV]
    python -m mmcore.index search DIR "a cat on a sofa" [-k 5] [--image PHOTO]

Under `torchrun --nproc_per_node N` (or `accelerate launch`) the build embeds 1/N of the files
in each process and rank 0 merges the shards; the result equals a one-process build.
"""

import os
from pathlib import Path

import torch

from . import cache
from .errors import InputError
from .index import THUMBNAIL, Index, image_files


def _distributed():
    """(rank, world) under torchrun / accelerate launch, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def build_folder(kit, folder, out, captions_csv=None, thumbnail_size=THUMBNAIL,
                 overwrite: bool = False) -> Index | None:
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
    index = Index(kit.encoder() if hasattr(kit, "encoder") else kit, thumbnail_size)
    index.add(mine, [captions.get(p.name, "") for p in mine])
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
        merged.thumbnails = [part.thumbnails[i] for _, part, i in rows]
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
    b.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds files mmcore did not write")
    b.add_argument("--captions", help="CSV with columns image, caption (file names)")
    s = sub.add_parser("search", help="search a saved index")
    s.add_argument("index")
    s.add_argument("query", nargs="?", help="text to search for")
    s.add_argument("--image", help="an image file to search by")
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--negative", help="text to move away from")
    b.add_argument("--no-thumbnails", dest="thumbnails", action="store_false",
                   help="keep no thumbnails in the index (smaller; images show as ids)")
    for sp in (b, s):
        sp.add_argument("--kit", default=os.environ.get("MMCORE_KIT", "offline"))
    args = p.parse_args(argv)
    kit = load_kit(args.kit)
    try:
        if args.command == "build":
            index = build_folder(kit, args.folder, args.out, args.captions,
                                 THUMBNAIL if args.thumbnails else 0, args.overwrite)
            if index is not None:
                print(f"indexed {len(index)} images into {args.out}")
        else:
            index = Index.load(args.index, kit)
            hits = index.search(text=args.query, image=args.image, k=args.k,
                                negative=args.negative)
            for pid, score in hits:
                print(f"{score:.4f}  {pid}")
    except InputError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
