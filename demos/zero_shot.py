"""CLIP zero-shot tab: an image and free-text labels in, label probabilities out."""

import os
import tempfile

import gradio as gr

from mmcore import InputError, demo_data, images as mm_images, tables, zero_shot as zs

from .context import AppContext, guarded

TITLE = "Zero-shot"
PHOTOS = {"chelsea": "a cat, a dog, a horse, a car, a cup of coffee",
          "astronaut": "an astronaut, a rocket, a cat, a cup of coffee, a pile of coins",
          "coffee": "a cup of coffee, a glass of beer, a cat, a rocket, a horse",
          "rocket": "a rocket, a bird, a cat, a cup of coffee, a horse",
          "camera": "a man with a camera, a cat, a car, a bowl of soup, a rocket",
          "horse": "a horse, a cat, a car, a cup of coffee, a rocket"}
MAX_BATCH = 64


def example_files() -> list:
    """The bundled scikit-image photos written once to a folder of the app's own."""
    folder = os.path.join(os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir(),
                          "mmcore-demo")
    paths = demo_data.photo_files(folder, PHOTOS)
    return [[str(path), labels] for path, labels in zip(paths, PHOTOS.values())]


def upload_path(value):
    """The uploaded file's path. The event skips Gradio's own image decoding
    (preprocess=False), so every upload goes through mmcore's safe loader and its caps."""
    if isinstance(value, dict):
        value = value.get("path")
    return value or None


def build(ctx: AppContext) -> None:
    @guarded
    def zero_shot(image, labels: str, template: str, ensemble: bool, score: str,
                  threshold: float, model: str = "base model"):
        """Classify one image among free-text labels (model: the base or a fine-tuned one)."""
        image = upload_path(image)
        if image is None:
            raise InputError("Upload an image (or pick an example).")
        result = ctx.kit_for(model).zero_shot_details([image], labels, template or "a photo of {}.",
                                           ensemble=bool(ensemble), score=score,
                                           threshold=float(threshold) if threshold else None)[0]
        chart = {label: value for label, value in result.ranked} if score != "cosine" else \
            {label: max(0.0, value) for label, value in result.ranked}
        rows = [[label, round(value, 4), round(result.cosines.get(label, float("nan")), 4)]
                for label, value in result.ranked]
        return chart, rows, "\n".join(f"- {n}" for n in result.notices)

    @guarded
    def zero_shot_batch(files, labels: str, template: str, ensemble: bool, score: str):
        """Several images in; a table and a CSV of the best label and every score out."""
        if not files:
            raise InputError("Upload one or more images.")
        paths = [upload_path(f) for f in files][:MAX_BATCH]
        pils, errors = mm_images.load_images(paths)
        names = [os.path.basename(p) for p in paths if os.path.basename(p) not in
                 {e[0] for e in errors}]
        rows = []
        if pils:
            results = ctx.kit.zero_shot_details(pils, labels, template or "a photo of {}.",
                                                ensemble=bool(ensemble), score=score)
            for name, r in zip(names, results):
                rows.append({"image": name, "best": r.ranked[0][0],
                             "score": f"{r.ranked[0][1]:.4f}",
                             "all": "; ".join(f"{lab}={v:.4f}" for lab, v in r.ranked),
                             "error": ""})
        rows += [{"image": n, "error": msg} for n, msg in errors]
        columns = ["image", "best", "score", "all", "error"]
        path = tables.write_csv(rows, columns, "zero_shot_results.csv")
        note = f"{len(pils)} classified, {len(errors)} skipped." + \
            (f" Only the first {MAX_BATCH} files were used." if len(files) > MAX_BATCH else "")
        return [[r.get(c, "") for c in columns] for r in rows], path, note

    spec = ctx.kit.spec("dual_encoder")
    note = (" ConSE maps the image's top ImageNet classes into the text space, so labels far "
            "from ImageNet's 1000 classes are hard for it." if spec.backend == "conse" else "")
    gr.Markdown(f"Dual encoder: **{spec.name}**. Labels are compared with the image in a shared "
                f"embedding space.{note}")
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"])
            labels = gr.Textbox(label="Labels (comma or newline separated)", lines=3,
                                max_length=50_000, value=PHOTOS["chelsea"])
            with gr.Row():
                template = gr.Textbox(label="Template", value="a photo of {}.", max_length=300)
                ensemble = gr.Checkbox(label=f"Ensemble of {len(zs.ENSEMBLE)} photo templates")
            with gr.Row():
                score = gr.Radio(list(zs.SCORES), value="softmax", label="Scores")
                threshold = gr.Slider(0, 1, value=0, step=0.01,
                                      label="'None of these' below cosine (0 = off)")
            model = gr.Dropdown(ctx.encoder_choices(), value="base model",
                                label="Dual encoder (fine-tuned ones appear after training)")
            go = gr.Button("Classify", variant="primary")
        with gr.Column():
            chart = gr.Label(label="Labels", num_top_classes=10)
            table = gr.Dataframe(headers=["label", "score", "cosine"], interactive=False)
            notes = gr.Markdown()
    gr.Examples(example_files(), [image, labels])
    model.focus(lambda: gr.update(choices=ctx.encoder_choices()), None, model,
                api_visibility="private", queue=False)
    go.click(zero_shot, [image, labels, template, ensemble, score, threshold, model],
             [chart, table, notes], api_name="zero_shot", preprocess=False,
             **ctx.model_event())
    with gr.Accordion("Batch: many images, one set of labels", open=False):
        files = gr.File(label="Images", file_count="multiple", file_types=["image"])
        go_batch = gr.Button("Classify all")
        batch_table = gr.Dataframe(headers=["image", "best", "score", "all", "error"],
                                   interactive=False)
        batch_csv = gr.File(label="CSV")
        batch_note = gr.Markdown()
        go_batch.click(zero_shot_batch, [files, labels, template, ensemble, score],
                       [batch_table, batch_csv, batch_note], api_name="zero_shot_batch",
                       preprocess=False, **ctx.model_event("long"))
