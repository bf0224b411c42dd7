"""Retrieval tab: search a gallery by text or by image (with a negative term), click a result
to search by it; galleries come from the bundled demo photos, uploads (images or a .zip), or
a server folder the operator names with --gallery-dir. Each user's index is their own."""

import os
import shutil
import tempfile
from pathlib import Path

import gradio as gr

from mmcore import Index, InputError, archives, demo_data, index as index_mod

from .context import AppContext, guarded
from .zero_shot import upload_path

TITLE = "Retrieval"
MAX_IMAGES = 2000          # per user
CHUNK = 32
DEMO = {"astronaut": "an astronaut in a white suit in front of a flag",
        "chelsea": "a tabby cat looking to the side", "coffee": "a cup of coffee on a saucer",
        "rocket": "a rocket standing on its launch pad", "camera": "a man holding a camera",
        "horse": "the silhouette of a horse", "clock": "a clock hanging on a wall",
        "page": "a printed page of text", "coins": "old coins on a dark background",
        "moon": "the surface of the moon"}


def demo_gallery() -> tuple:
    folder = Path(os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir()) / "mmcore-demo"
    return demo_data.photo_files(folder, DEMO), list(DEMO.values())


def results(index: Index, hits: list) -> list:
    return [(pid, f"{score:.3f} · {index.captions[index.ids.index(pid)] or Path(pid).name}")
            for pid, score in hits]


def build(ctx: AppContext) -> None:
    def grow(index, paths, captions=None, model=None):
        """Embed in chunks, yielding progress; Stop takes effect between chunks."""
        encoder = ctx.kit_for(model).encoder()
        if index is not None and index.identity != encoder.identity:
            index = None                          # another model: start a fresh gallery
        index = index if index is not None else Index(encoder)
        if len(index) + len(paths) > MAX_IMAGES:
            raise InputError(f"A gallery holds at most {MAX_IMAGES} images here "
                             f"({len(index)} already, {len(paths)} new).")
        captions = captions or [""] * len(paths)
        errors, added, dupes = [], 0, 0
        for start in range(0, len(paths), CHUNK):
            report = index.add(paths[start:start + CHUNK], captions[start:start + CHUNK])
            errors += report["errors"]
            added, dupes = added + report["added"], dupes + report["duplicates"]
            done = min(len(paths), start + CHUNK)
            yield index, f"Embedding… {done}/{len(paths)}"
        lines = [f"{len(index)} images in the gallery ({added} added, {dupes} already there)."]
        lines += [f"- skipped {Path(n).name}: {m}" for n, m in errors[:50]]
        yield index, "\n".join(lines)

    @guarded
    def load_demo(index, model="base model"):
        """Index the bundled demo photos (with their captions)."""
        paths, captions = demo_gallery()
        yield from grow(index, [str(p) for p in paths], captions, model)

    @guarded
    def upload(index, files, model="base model"):
        """Index uploaded images and/or .zip archives of images (extracted safely)."""
        if not files:
            raise InputError("Choose images or a .zip file to upload.")
        paths, notes = [], []
        for f in files:
            path = upload_path(f)
            if str(path).lower().endswith(".zip"):
                _, extracted, skipped = archives.safe_extract(path, index_mod.IMAGE_SUFFIXES)
                paths += [str(p) for p in extracted]
                notes += [f"- skipped {n} in the zip: {why}" for n, why in skipped[:50]]
            else:
                paths.append(str(path))
        for index, status in grow(index, paths, None, model):
            yield index, "\n".join([status] + notes)

    @guarded
    def server_folder(index, model="base model"):
        """Index the folder the operator named with --gallery-dir."""
        if not ctx.gallery_dir:
            raise InputError("The server was not started with --gallery-dir.")
        yield from grow(index, [str(p) for p in index_mod.image_files(ctx.gallery_dir)],
                        None, model)

    @guarded
    def search(index, query: str, image, negative: str, k: float):
        """Search the gallery by text or image (image wins when both are given)."""
        if index is None or len(index) == 0:
            raise InputError("The gallery is empty: load the demo photos or upload images.")
        q = upload_path(image) or (query or "").strip()
        if not q:
            raise InputError("Type a query or give an image.")
        hits = index.search(q, int(k), (negative or "").strip() or None)
        return results(index, hits)

    @guarded
    def search_by_result(index, k: float, evt: gr.SelectData):
        """Search by the clicked result."""
        pid = (evt.value or {}).get("image", {}).get("path") if isinstance(evt.value, dict) \
            else None
        pid = index.ids[evt.index] if pid is None or pid not in index.ids else pid
        return results(index, index.search(pid, int(k)))

    @guarded
    def recall(index):
        """Image-to-text and text-to-image recall@1/5/10 over the captioned images."""
        if index is None:
            raise InputError("The gallery is empty.")
        return {k: round(v, 3) for k, v in index.recall().items()}

    @guarded
    def save(index):
        """Download the index (vectors, metadata, model identity) as a zip."""
        if index is None or len(index) == 0:
            raise InputError("The gallery is empty.")
        folder = Path(tempfile.mkdtemp(prefix="mmcore-index-",
                                       dir=os.environ.get("GRADIO_TEMP_DIR")))
        index.save(folder / "index")
        return shutil.make_archive(str(folder / "mmcore-index"), "zip", folder / "index")

    @guarded
    def load(index, file, model="base model"):
        """Load a saved index zip; refused if it was built with another model."""
        if file is None:
            raise InputError("Choose a saved index .zip.")
        folder, _, _ = archives.safe_extract(upload_path(file))
        loaded = Index.load(folder, ctx.kit_for(model))
        missing = sum(not Path(p).exists() for p in loaded.ids)
        note = f" ({missing} image files are not on this server: results show their ids)" \
            if missing else ""
        return loaded, f"Loaded {len(loaded)} images{note}."

    @guarded
    def export(index, fmt: str):
        """Embeddings and metadata as .npz or .csv."""
        if index is None or len(index) == 0:
            raise InputError("The gallery is empty.")
        folder = tempfile.mkdtemp(prefix="mmcore-export-", dir=os.environ.get("GRADIO_TEMP_DIR"))
        return str(index.export(Path(folder) / f"embeddings.{fmt}"))

    state = gr.State(None)
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
                api_visibility="private", queue=False)
    status = gr.Markdown()
    with gr.Row():
        query = gr.Textbox(label="Text query", max_length=2000, scale=3)
        negative = gr.Textbox(label="…but not (optional)", max_length=2000, scale=2)
        image = gr.Image(label="…or search by image", type="filepath", height=140, scale=1)
        k = gr.Slider(1, 50, value=8, step=1, label="Top k", scale=1)
    go = gr.Button("Search", variant="primary")
    gallery = gr.Gallery(label="Results (click one to search by it)", columns=4, height="auto")
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
    go.click(search, [state, query, image, negative, k], gallery, api_name="search",
             preprocess=False, **ctx.model_event())
    query.submit(search, [state, query, image, negative, k], gallery, api_visibility="private",
                 preprocess=False, **ctx.model_event())
    gallery.select(search_by_result, [state, k], gallery, api_visibility="private",
                   **ctx.model_event())
    save_btn.click(save, [state], download, api_name="save_index")
    load_btn.click(load, [state, load_file, model], [state, status], api_name="load_index",
                   preprocess=False)
    export_btn.click(export, [state, fmt], download, api_name="export_embeddings")
    recall_btn.click(recall, [state], recall_out, api_name="recall", **ctx.model_event("long"))
