"""Retrieval tab: search a gallery by text or by image (with a negative term), click a result
to search by it; galleries come from the bundled demo photos, uploads (images or a .zip), or
a server folder the operator names with --gallery-dir. Each user's gallery is their own.

What a client sees of an image is the index's own thumbnail (decoded and re-encoded here),
never a file named by an id: ids and captions, above all those of a loaded index, are text.
"""

import hashlib
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image

from mmcore import Index, InputError, archives, demo_data, images as mm_images, tables
from mmcore import index as index_mod
from mmcore.datadir import RESTART_NOTICE

from .context import AppContext, guarded, text_md
from .files import uploaded, uploaded_list

TITLE = "Retrieval"
MAX_IMAGES = 2000          # per user
MAX_THUMBNAIL_SIDE = 1024  # pixels; a loaded index's thumbnails beyond it are not decoded
CHUNK = 32
DEMO = {"astronaut": "an astronaut in a white suit in front of a flag",
        "chelsea": "a tabby cat looking to the side", "coffee": "a cup of coffee on a saucer",
        "rocket": "a rocket standing on its launch pad", "camera": "a man holding a camera",
        "horse": "the silhouette of a horse", "clock": "a clock hanging on a wall",
        "page": "a printed page of text", "coins": "old coins on a dark background",
        "moon": "the surface of the moon"}


@dataclass
class Gallery:
    """One user's gallery: the index and which rows the results on screen show."""
    index: Index | None = None
    shown: list = field(default_factory=list)      # index positions, in display order
    scores: list = field(default_factory=list)     # their cosine similarities
    query: str = ""                                # which query gave them, in words

    def require(self) -> Index:
        if self.index is None or len(self.index) == 0:
            raise InputError("The gallery is empty: load the demo photos or upload images.")
        return self.index


def thumbnail_file(raw: bytes, folder: Path) -> Path | None:
    """The thumbnail as a JPEG we encoded ourselves (a loaded index's bytes are untrusted:
    decoded by the safe loader, never served as they came); None when there is none."""
    if not raw:
        return None
    target = folder / f"{hashlib.sha256(raw).hexdigest()[:32]}.jpg"
    if not target.exists():
        try:
            with Image.open(io.BytesIO(raw)) as head:          # the header only
                if max(head.size) > MAX_THUMBNAIL_SIDE:
                    return None                                  # no "thumbnail" bombs
            im = mm_images.load_image(raw)
        except (InputError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None
        im.thumbnail((index_mod.THUMBNAIL * 2, index_mod.THUMBNAIL * 2))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(target)
    return target


def build(ctx: AppContext) -> None:
    def tile() -> str:
        """A plain tile for results without a thumbnail (the id is their caption)."""
        path = ctx.work_dir / "no-thumbnail.png"
        if not path.exists():
            Image.new("RGB", (index_mod.THUMBNAIL, index_mod.THUMBNAIL), (225, 225, 225)) \
                .save(path)
        return str(path)

    def show(gallery: Gallery, hits: list, request, query: str) -> tuple:
        index, folder = gallery.index, ctx.files.thumbs(request)
        gallery.shown = [pos for pos, _ in hits]
        gallery.scores, gallery.query = [score for _, score in hits], query
        items, rows = [], []
        for pos, score in hits:
            path = thumbnail_file(index.thumbnails[pos], folder)
            label = index.captions[pos] or index.ids[pos]
            items.append((str(path) if path else tile(), f"{score:.3f} · {label}"))
            rows.append({"id": index.ids[pos], "score": score, "caption": index.captions[pos]})
        return items, gallery, rows          # rows: the results as numbers, for programs

    def grow(gallery, images, ids, captions, model):
        """Embed in chunks, yielding progress; Stop takes effect between chunks."""
        gallery = gallery if isinstance(gallery, Gallery) else Gallery()
        encoder, kept = ctx.kit_for(model).encoder(), ""
        if gallery.index is None or len(gallery.index) == 0:
            gallery.index, gallery.shown = Index(encoder), []
        elif gallery.index.identity != encoder.identity:
            # one gallery, one model: new images join it, embedded as it was (never dropped)
            kept = (f"\n\nThe gallery was built with another model than “{text_md(model)}”; "
                    "the new images were embedded with the gallery's own, so it stays whole. "
                    "Clear the gallery to start one with the model chosen.")
        index = gallery.index
        if len(index) + len(images) > MAX_IMAGES:
            raise InputError(f"A gallery holds at most {MAX_IMAGES} images here "
                             f"({len(index)} already, {len(images)} new).")
        captions = captions or [""] * len(images)
        yield gallery, f"Embedding… 0/{len(images)}"     # a cancel is seen only after a yield
        errors, added, dupes = [], 0, 0
        for start in range(0, len(images), CHUNK):
            part = slice(start, start + CHUNK)
            report = index.add(images[part], captions[part], ids=ids[part])
            errors += report["errors"]
            added, dupes = added + report["added"], dupes + report["duplicates"]
            yield gallery, f"Embedding… {min(len(images), start + CHUNK)}/{len(images)}"
        lines = [f"{len(index)} images in the gallery ({added} added, {dupes} already there)."]
        lines += [f"- skipped {text_md(n)}: {text_md(m)}" for n, m in errors[:50]]
        yield gallery, "\n".join(lines) + kept

    @guarded
    def load_demo(gallery, model="base model"):
        """Index the bundled demo photos (with their captions)."""
        paths = demo_data.photo_files(ctx.work_dir / "photos", DEMO)
        yield from grow(gallery, [str(p) for p in paths], [p.name for p in paths],
                        list(DEMO.values()), model)

    @guarded
    def upload(gallery, files=None, model="base model", request: gr.Request = None):
        """Index uploaded images and/or .zip archives of images (extracted safely, counted
        against your session's disk space, removed when the request ends)."""
        uploads = uploaded_list(files, "upload", ctx.max_uploads)
        if not uploads:
            raise InputError("Choose images or a .zip file to upload.")
        with ctx.files.request(request) as work:
            images, ids, notes = [], [], []
            for n, up in enumerate(uploads):
                if up.name.lower().endswith(".zip"):
                    folder, extracted, skipped = archives.safe_extract(
                        up.path, index_mod.IMAGE_SUFFIXES, work / str(n),
                        ctx.files.budget(request))
                    images += [str(p) for p in extracted]
                    ids += [p.relative_to(folder).as_posix() for p in extracted]
                    notes += [f"- skipped {text_md(e)} in the zip: {text_md(why)}"
                              for e, why in skipped[:50]]
                else:
                    images.append(str(up.path))
                    ids.append(up.name)
            for gallery, status in grow(gallery, images, ids, None, model):
                yield gallery, "\n".join([status] + notes)

    @guarded
    def server_folder(gallery, model="base model"):
        """Index the folder the operator named with --gallery-dir."""
        if not ctx.gallery_dir:
            raise InputError("The server was not started with --gallery-dir.")
        files = index_mod.image_files(ctx.gallery_dir)
        yield from grow(gallery, [str(p) for p in files],
                        [p.relative_to(ctx.gallery_dir).as_posix() for p in files], None, model)

    @guarded
    def search(gallery, query: str | None = None, image=None, negative: str | None = None,
               k: float = 10, request: gr.Request = None):
        """Search the gallery by text or image (image wins when both are given)."""
        picture = uploaded(image, "image")
        gallery = gallery if isinstance(gallery, Gallery) else Gallery()
        index = gallery.require()
        query = (query or "").strip() if isinstance(query, str) else query
        if picture is None and not query:
            raise InputError("Type a query or give an image.")
        negative = (negative or "").strip() if isinstance(negative, str) else negative
        vector = index.query_vector(text=None if picture else query,
                                    image=str(picture.path) if picture else None,
                                    negative=negative or None)
        if picture is not None:
            said = "your query image" + (" (the typed text was not used: clear the image to "
                                         "search by text)" if query else "")
        else:
            said = f"the text “{text_md(query)}”"
        said += f" but not “{text_md(negative)}”" if negative else ""
        return show(gallery, index.nearest(vector, k), request, said)

    @guarded
    def search_by_result(gallery, k: float, evt: gr.SelectData, request: gr.Request = None):
        """Search by the clicked result: by its stored vector (what the event names is
        ignored beyond its position on screen)."""
        gallery = gallery if isinstance(gallery, Gallery) else Gallery()
        index = gallery.require()
        position = evt.index if isinstance(evt.index, int) else None
        if position is None or not 0 <= position < len(gallery.shown):
            raise InputError("Click one of the results shown.")
        row = gallery.shown[position]
        said = f"the image “{text_md(index.ids[row])}” (a result you clicked)"
        return show(gallery, index.nearest(index.vectors[row], k), request, said)

    def results(gallery, request: gr.Request = None):
        """Which query ran, and the results as a table to download."""
        if not isinstance(gallery, Gallery) or gallery.index is None or not gallery.shown:
            return "", None
        index = gallery.index
        rows = [{"rank": n + 1, "score": round(score, 4), "id": index.ids[pos],
                 "caption": index.captions[pos]}
                for n, (pos, score) in enumerate(zip(gallery.shown, gallery.scores))]
        target = ctx.files.download(request, "results.csv")
        path = tables.write_csv(rows, ["rank", "score", "id", "caption"], target.name,
                                target.parent)
        return f"Results for {gallery.query}: {len(rows)} images, by cosine similarity.", path

    def clear():
        return Gallery(), "The gallery is empty: load the demo photos or upload images.", \
            [], "", None

    @guarded
    def recall(gallery):
        """Image-to-text and text-to-image recall@1/5/10 over the captioned images."""
        gallery = gallery if isinstance(gallery, Gallery) else Gallery()
        return {k: round(v, 3) for k, v in gallery.require().recall().items()}

    @guarded
    def save(gallery, request: gr.Request = None):
        """Download the index (vectors, thumbnails, metadata, model identity) as a zip."""
        gallery = gallery if isinstance(gallery, Gallery) else Gallery()
        index = gallery.require()
        target = ctx.files.download(request, "mmcore-index.zip")
        with ctx.files.request(request) as work:
            index.save(work / "index")
            return shutil.make_archive(str(target.with_suffix("")), "zip", work / "index")

    @guarded
    def load(gallery, file=None, model="base model", request: gr.Request = None):
        """Load a saved index zip; refused if it was built with another model."""
        up = uploaded(file, "saved index")
        if up is None:
            raise InputError("Choose a saved index .zip.")
        with ctx.files.request(request) as work:
            folder, _, _ = archives.safe_extract(up.path, dest=work / "index",
                                                 budget=ctx.files.budget(request))
            loaded = Index.load(folder, ctx.kit_for(model))
        if len(loaded) > MAX_IMAGES:
            raise InputError(f"This index holds {len(loaded):,} images; a gallery here holds "
                             f"at most {MAX_IMAGES}.")
        bare = sum(not t for t in loaded.thumbnails)
        note = f" ({bare} came without a thumbnail: results show their ids)" if bare else ""
        return Gallery(loaded), f"Loaded {len(loaded)} images{note}."

    @guarded
    def export(gallery, fmt: str, request: gr.Request = None):
        """Embeddings and metadata as .npz or .csv."""
        gallery = gallery if isinstance(gallery, Gallery) else Gallery()
        index = gallery.require()
        if fmt not in ("npz", "csv"):
            raise InputError("Export to npz or csv.")
        return str(index.export(ctx.files.download(request, f"embeddings.{fmt}")))

    state = gr.State(None)
    if ctx.data.lost_on_restart:
        gr.Markdown(RESTART_NOTICE)
    gr.Markdown(f"Dual encoder: **{ctx.kit.spec('dual_encoder').name}**. Your gallery is yours "
                f"alone (up to {MAX_IMAGES} images) and lasts for this browser session.")
    with gr.Row():
        demo_btn = gr.Button("Load the demo photos")
        files = gr.File(label="Upload images or a .zip", file_count="multiple",
                        file_types=["image", ".zip"])
        upload_btn = gr.Button("Add uploads")
        folder_btn = gr.Button("Index the server folder", visible=bool(ctx.gallery_dir))
        stop_btn = gr.Button("Stop", variant="stop")
    model = gr.Dropdown(ctx.encoder_choices(), value="base model",
                        label="Dual encoder for new galleries (fine-tuned ones appear after "
                              "training)")
    model.focus(lambda: gr.update(choices=ctx.encoder_choices()), None, model,
                api_visibility="private")
    clear_btn = gr.Button("Clear the gallery", size="sm")
    status = gr.Markdown(label="Gallery")
    with gr.Row():
        with gr.Column(scale=3):
            query = gr.Textbox(label="Text query", max_length=2000)
            negative = gr.Textbox(label="…but not (optional)", max_length=2000)
            k = gr.Slider(1, 50, value=8, step=1, label="Top k")
        image = gr.Image(label="…or search by image (it wins over the text)", type="filepath",
                         height=220, scale=2, min_width=220)
    go = gr.Button("Search", variant="primary")
    used = gr.Markdown(label="Query used")
    # no preview: a click is "search by this" (a preview would stay over the new results)
    gallery = gr.Gallery(label="Results (click one to search by it)", columns=4, height="auto",
                         allow_preview=False, buttons=["download_all"])
    table = gr.File(label="Results (.csv)")
    with gr.Accordion("Save, load, export, evaluate", open=False):
        with gr.Row():
            save_btn = gr.Button("Save index")
            load_file = gr.File(label="Saved index .zip", file_types=[".zip"])
            load_btn = gr.Button("Load index")
        with gr.Row():
            fmt = gr.Radio(["npz", "csv"], value="npz", label="Export format")
            export_btn = gr.Button("Export embeddings")
            recall_btn = gr.Button("Recall@k (captioned images)")
        download = gr.File(label="Download")
        recall_out = gr.JSON(label="Recall")

    embed_events = [
        demo_btn.click(load_demo, [state, model], [state, status], api_name="load_demo_gallery",
                       **ctx.model_event("long")),
        upload_btn.click(upload, [state, files, model], [state, status], api_name="add_images",
                         preprocess=False, **ctx.model_event("long")),
        folder_btn.click(server_folder, [state, model], [state, status], api_visibility="private",
                         **ctx.model_event("long")),
    ]
    stop_btn.click(None, None, None, cancels=embed_events, api_visibility="private")
    hits = gr.JSON(visible=False, label="Results as numbers")     # [{id, score, caption}]
    found = [gallery, state, hits]
    searches = [
        go.click(search, [state, query, image, negative, k], found, api_name="search",
                 preprocess=False, **ctx.model_event()),
        query.submit(search, [state, query, image, negative, k], found,
                     api_visibility="private", preprocess=False, **ctx.model_event()),
        gallery.select(search_by_result, [state, k], found, api_visibility="private",
                       **ctx.model_event())]
    for searched in searches:
        searched.success(results, [state], [used, table], api_visibility="private")
    clear_btn.click(clear, None, [state, status, gallery, used, table], api_visibility="private")
    save_btn.click(save, [state], download, api_name="save_index")
    load_btn.click(load, [state, load_file, model], [state, status], api_name="load_index",
                   preprocess=False)
    export_btn.click(export, [state, fmt], download, api_name="export_embeddings")
    recall_btn.click(recall, [state], recall_out, api_name="recall", **ctx.model_event("long"))
