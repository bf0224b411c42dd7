"""CLIP zero-shot tab: an image and free-text labels in, label probabilities out.

One image and a batch go through the same function (`classify`), with the same dual encoder,
template, scores and threshold; a batch yields its progress image by image, so Stop ends it
between images, and one bad file is a row with its reason.
"""

import gradio as gr

from mmcore import InputError, demo_data, images as mm_images, tables, zero_shot as zs
from mmcore.dual_encoder import TowerDualEncoder
from mmcore.text import as_number, clean_text

from .context import AppContext, guarded, text_md
from .files import uploaded

TITLE = "Zero-shot"
PHOTOS = {"chelsea": "a cat, a dog, a horse, a car, a cup of coffee",
          "astronaut": "an astronaut, a rocket, a cat, a cup of coffee, a pile of coins",
          "coffee": "a cup of coffee, a glass of beer, a cat, a rocket, a horse",
          "rocket": "a rocket, a bird, a cat, a cup of coffee, a horse",
          "camera": "a man with a camera, a cat, a car, a bowl of soup, a rocket",
          "horse": "a horse, a cat, a car, a cup of coffee, a rocket"}
MAX_PROMPTS = 4000      # label x template texts per request: the model slot is shared
COLUMNS = ["image", "best", "score", "all", "error"]
SCORE_HELP = (
    "**Scores.** *softmax*: the labels compete, scores sum to 1 (as CLIP's pipeline). "
    "*sigmoid*: an independent yes/no per label, unaffected by the other labels: the model's "
    "own sigmoid (scale and bias) where it has one (SigLIP); otherwise "
    "σ(scale × (cosine − cosine of the template with no label)), above 0.5 when the label "
    "fits better than the bare template. *cosine*: the raw similarity. "
    f"**'{zs.NONE_LABEL}'**: with a threshold, it is one more label whose cosine is the "
    "threshold, scored the same way; it comes first, and is the verdict, exactly when no "
    "label's cosine reaches the threshold.")


def example_files(ctx: AppContext) -> list:
    """The bundled scikit-image photos written once to a folder of the app's own."""
    paths = demo_data.photo_files(ctx.work_dir / "photos", PHOTOS)
    return [[str(path), labels] for path, labels in zip(paths, PHOTOS.values())]


def classify(kit, image, labels, template, ensemble, score, threshold):
    """One image (already decoded) -> its ZeroShotResult: the single and the batch path."""
    template = zs.check_template(template or "a photo of {}.")
    labels = clean_text(labels, "Labels", 100_000, allow_empty=True)   # raw client value
    n_labels = len([x for x in labels.replace("\n", ",").split(",") if x.strip()])
    n_templates = len(zs.ENSEMBLE) if ensemble else 1
    if n_labels * n_templates > MAX_PROMPTS:
        raise InputError(f"{n_labels} labels x {n_templates} templates is more than "
                         f"{MAX_PROMPTS:,} prompts; use fewer labels or one template.")
    threshold = as_number(threshold or 0, "Threshold", 0, 1)
    return kit.zero_shot_details([image], labels, template, ensemble=bool(ensemble),
                                 score=score, threshold=threshold or None)[0]


def build(ctx: AppContext) -> None:
    @guarded
    def zero_shot(image=None, labels: str = "", template: str = "a photo of {}.",
                  ensemble: bool = False, score: str = "softmax", threshold: float = 0,
                  model: str = "base model"):
        """Classify one image among free-text labels (model: the base or a fine-tuned one)."""
        upload = uploaded(image, "image")
        if upload is None:
            raise InputError("Upload an image (or pick an example).")
        result = classify(ctx.kit_for(model), mm_images.load_image(upload.path), labels,
                          template, ensemble, score, threshold)
        # ranked is best first and its top is the verdict; gr.Label re-sorts by value (a
        # stable sort), so the chart's headline is the verdict too
        chart = {label: value if score != "cosine" else max(0.0, value)
                 for label, value in result.ranked}
        rows = [[label, round(value, 4), round(result.cosines.get(label, float("nan")), 4)]
                for label, value in result.ranked]
        notes = [f"**Verdict: {text_md(result.verdict)}**"] + \
            [f"- {text_md(n)}" for n in result.notices]
        return chart, rows, "\n".join(notes)

    @guarded
    def zero_shot_batch(files=None, labels: str = "", template: str = "a photo of {}.",
                        ensemble: bool = False, score: str = "softmax",
                        threshold: float = 0, model: str = "base model",
                        request: gr.Request = None):
        """Several images in; a table and a CSV of the best label and every score out (one
        row per upload, in order; a bad file is a row with its reason)."""
        if not files:
            raise InputError("Upload one or more images.")
        if not isinstance(files, list):
            files = [files]
        if len(files) > ctx.max_uploads:
            raise InputError(f"{len(files)} files; at most {ctx.max_uploads} per request.")
        kit = ctx.kit_for(model)
        zs.check_template(template or "a photo of {}.")      # fail once, not once per row
        zs.parse_labels(clean_text(labels, "Labels", 100_000, allow_empty=True))
        yield gr.skip(), gr.skip(), f"Classifying… 0/{len(files)}"   # a cancel needs a yield
        rows = []
        for n, value in enumerate(files):
            try:
                upload = uploaded(value, "image")
                name = upload.name
                result = classify(kit, mm_images.load_image(upload.path), labels, template,
                                  ensemble, score, threshold)
                rows.append({"image": name, "best": result.ranked[0][0],
                             "score": f"{result.ranked[0][1]:.4f}",
                             "all": "; ".join(f"{lab}={v:.4f}" for lab, v in result.ranked),
                             "error": ""})
            except InputError as exc:
                name = value.get("orig_name") if isinstance(value, dict) else None
                rows.append({"image": str(name or f"file {n + 1}")[:200], "error": str(exc)})
            yield (gr.skip(), gr.skip(), f"Classifying… {n + 1}/{len(files)}")
        target = ctx.files.download(request, "zero_shot_results.csv")
        path = tables.write_csv(rows, COLUMNS, target.name, target.parent)
        bad = sum(1 for r in rows if r["error"])
        yield ([[r.get(c, "") for c in COLUMNS] for r in rows], path,
               f"{len(rows) - bad} classified, {bad} skipped.")

    spec = ctx.kit.spec("dual_encoder")
    note = (" ConSE maps the image's top ImageNet classes into the text space, so labels far "
            "from ImageNet's 1000 classes are hard for it."
            if issubclass(ctx.kit.role_class("dual_encoder"), TowerDualEncoder) else "")
    gr.Markdown(f"Dual encoder: **{spec.name}**. Labels are compared with the image in a shared "
                f"embedding space.{note}")
    gr.Markdown(SCORE_HELP)
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
            table = gr.Dataframe(headers=["label", "score", "cosine"], interactive=False,
                                 label="Scores")
            notes = gr.Markdown(label="Verdict and notes")
    gr.Examples(example_files(ctx), [image, labels])
    model.focus(lambda: gr.update(choices=ctx.encoder_choices()), None, model,
                api_visibility="private")
    go.click(zero_shot, [image, labels, template, ensemble, score, threshold, model],
             [chart, table, notes], api_name="zero_shot", preprocess=False,
             **ctx.model_event())
    with gr.Accordion("Batch: many images, one set of labels", open=False):
        files = gr.File(label="Images", file_count="multiple", file_types=["image"])
        go_batch = gr.Button("Classify all")
        batch_table = gr.Dataframe(headers=["image", "best", "score", "all", "error"],
                                   interactive=False, label="Rows")
        batch_csv = gr.File(label="CSV")
        batch_note = gr.Markdown(label="Report")
        stop_batch = gr.Button("Stop", variant="stop")
        batch = go_batch.click(zero_shot_batch, [files, labels, template, ensemble, score,
                                                 threshold, model],
                               [batch_table, batch_csv, batch_note], api_name="zero_shot_batch",
                               preprocess=False, **ctx.model_event("long"))
        stop_batch.click(None, None, None, cancels=[batch], api_visibility="private")
