"""The retrieval index's command line (`python -m mmcore.index`, or `mmcore-index`):

    mmcore-index build FOLDER --out DIR [--kit offline] [--captions CSV]
    mmcore-index search DIR "a cat on a sofa" "a red car" [-k 5] [--image PHOTO] [--json]
    printf 'a cat\\na dog\\n' | mmcore-index search DIR -     # one query per line
    mmcore-index serve DIR [--host 127.0.0.1] [--port 8765]   # HTTP back end (index_server.py)

One model load serves every query. Results go to stdout; progress, the data report (each
skipped file with its reason) and errors go to stderr. Exit status: 0 done, 1 nothing usable
or the model could not load, 2 a bad argument or input.

Under `torchrun --nproc_per_node N` (or `accelerate launch`) the build embeds 1/N of the files
in each process and rank 0 merges the shards; the result equals a one-process build.
"""

import json
import os
import sys
from pathlib import Path

import torch

from . import cache
from .errors import InputError, cli_status
from .index import THUMBNAIL, Index, image_files


def _distributed():
    """(rank, world) under torchrun / accelerate launch, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def build_folder(kit, folder, out, captions_csv=None, thumbnail_size=THUMBNAIL,
                 overwrite: bool = False, progress=None, report=None) -> Index | None:
    """Build an index of every image under `folder`; sharded across processes when launched
    by torchrun (rank r embeds files r, r+N, ...); rank 0 merges and saves.
    `progress(done, total)` is called per batch; `report` (a dict) receives this process's
    data report (added, duplicates, errors). Nothing is saved when no image is usable."""
    if not Path(folder).is_dir():
        raise InputError(f"{folder}: no such folder.")
    source, target = Path(folder).resolve(), Path(out).resolve()
    if target == source or target in source.parents or source in target.parents:
        raise InputError("--out must lie outside the folder of images (and not contain it): "
                         "writing the index there could replace the images.")
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
    # ids are paths relative to the folder: results never name the server's folders
    done = index.add(mine, [captions.get(p.name, "") for p in mine], progress,
                     ids=[p.relative_to(source).as_posix() for p in mine])
    if report is not None:
        report.update(done, files=len(files))
    if world == 1:
        if len(index) == 0:
            return index
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
        order = {p.relative_to(source).as_posix(): i for i, p in enumerate(files)}
        rows, seen = [], set()
        # file order, and one copy of each content as a one-process build keeps (the
        # first in file order): shards only de-duplicate within themselves
        for row in sorted(((order.get(pid, len(order)), part, i) for part in parts
                           for i, pid in enumerate(part.ids)), key=lambda x: x[0]):
            digest = row[1].hashes[row[2]]
            if digest in seen:
                if report is not None:
                    report["duplicates"] = report.get("duplicates", 0) + 1
                continue
            seen.add(digest)
            rows.append(row)
        if rows:
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


def _natural(text: str, low: int = 0, high: int = 2**31 - 1) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {value}")
    return value


def port(text: str) -> int:
    return _natural(text, 0, 65535)


def parser():
    import argparse

    from .kits import KIT_NAMES

    kit = dict(choices=KIT_NAMES, default=os.environ.get("MMCORE_KIT", "offline"),
               help="model kit whose dual encoder embeds (default: $MMCORE_KIT or offline)")
    p = argparse.ArgumentParser(
        prog="mmcore-index", description="Build, search and serve image-text indexes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser("build", help="index every image under a folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("folder", help="folder of images (searched recursively)")
    b.add_argument("--out", required=True, help="folder to write the index to")
    b.add_argument("--captions", help="CSV with columns image, caption (file names)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds files mmcore did not write")
    b.add_argument("--no-thumbnails", dest="thumbnails", action="store_false",
                   help="keep no thumbnails in the index (smaller; images show as ids)")
    s = sub.add_parser("search", help="search a saved index (several queries, one model load)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("index", help="folder of a saved index")
    s.add_argument("queries", nargs="*", metavar="QUERY",
                   help="texts to search for; '-' reads one query per line from stdin")
    s.add_argument("--image", action="append", default=[], metavar="PHOTO",
                   help="an image file to search by (repeat for several searches)")
    s.add_argument("-k", type=lambda t: _natural(t, 1), default=5, help="results per query")
    s.add_argument("--negative", help="text to move every query away from")
    s.add_argument("--json", action="store_true",
                   help="one JSON object per query: {query, results: [{id, score, caption}]}")
    v = sub.add_parser("serve", help="answer searches over HTTP (JSON) from a saved index",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("index", help="folder of a saved index")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on")
    v.add_argument("--port", type=port, default=8765, help="port to listen on")
    for sp in (b, s, v):
        sp.add_argument("--kit", **kit)
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _queries(args) -> list:
    """(kind, query) pairs: the texts (stdin for '-'), then the images."""
    texts = []
    for q in args.queries:
        if q == "-":
            texts += [line.strip() for line in sys.stdin if line.strip()]
        else:
            texts.append(q)
    queries = [("text", t) for t in texts] + [("image", p) for p in args.image]
    if not queries:
        raise InputError("Give a query: text, '-' for one per line on stdin, or --image PHOTO.")
    return queries


def _search(index, args) -> None:
    queries = _queries(args)
    for kind, query in queries:                      # every query checked before any answer
        if kind == "image" and not Path(query).is_file():
            raise InputError(f"{query}: no such file.")
    for kind, query in queries:
        hits = index.results(k=args.k, negative=args.negative, **{kind: query})
        if args.json:
            print(json.dumps({"query": query, "kind": kind, "results": [
                {key: h[key] for key in ("id", "score", "caption")} for h in hits]}))
            continue
        if len(queries) > 1:
            print(f"# {query}")
        for h in hits:
            print(f"{h['score']:.4f}  {h['id']}")


def _build(kit, args) -> int:
    from tqdm import tqdm

    bar = tqdm(unit="image", desc="embedding", disable=args.quiet, file=sys.stderr)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    report = {}
    try:
        index = build_folder(kit, args.folder, args.out, args.captions,
                             THUMBNAIL if args.thumbnails else 0, args.overwrite,
                             progress, report)
    finally:
        bar.close()
    for name, why in report.get("errors", []):
        print(f"skipped {name}: {why}", file=sys.stderr)
    if report.get("duplicates"):
        print(f"skipped {report['duplicates']} duplicate image(s) (same content)",
              file=sys.stderr)
    if index is None:                                 # a rank other than 0 of a sharded build
        return 0
    if len(index) == 0:
        print(f"error: no usable image under {args.folder} ({report.get('files', 0)} image "
              "file(s) found); nothing saved.", file=sys.stderr)
        return 1
    print(f"indexed {len(index)} images into {args.out}")
    return 0


def main(argv=None) -> int:
    from . import load_kit

    p = parser()
    args, extra = p.parse_known_args(argv)
    # queries may follow options (`search DIR -k 2 "a cat"`): argparse leaves them over
    if args.command == "search" and all(e == "-" or not e.startswith("-") for e in extra):
        args.queries += extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    def body() -> int:
        kit = load_kit(args.kit)
        if args.command == "build":
            return _build(kit, args)
        index = Index.load(args.index, kit)
        if args.command == "serve":
            from .index_server import serve

            serve(index, args.host, args.port)
        else:
            _search(index, args)
        return 0

    return cli_status(body)


if __name__ == "__main__":
    raise SystemExit(main())
