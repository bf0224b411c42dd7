"""Zero-shot image classification with any dual encoder.

Labels become prompts through a template (or an ensemble of templates, whose normalised text
embeddings are averaged, as in the CLIP paper); the image is compared with each label by
cosine similarity. Scores: "softmax" over the labels of logit_scale x cosine (what
transformers' pipeline reports), "sigmoid" of the same logits (independent yes/no per
label), or the raw "cosine". Label embeddings are cached per encoder, so a second image with
the same labels encodes only the image.
"""

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from .errors import InputError
from .text import clean_text

MAX_LABELS = 1000
NONE_LABEL = "none of these"
SCORES = ("softmax", "sigmoid", "cosine")

# Photo-style templates of our own for the ensemble ("{}" is the label).
ENSEMBLE = (
    "a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.", "a blurry photo of a {}.",
    "a bright photo of a {}.", "a dark photo of a {}.", "a cropped photo of a {}.",
    "a good photo of a {}.", "a low resolution photo of a {}.", "a jpeg photo of a {}.",
    "a photo of a small {}.", "a photo of a large {}.", "a photo of one {}.",
    "a photo of my {}.", "a photo of a nice {}.", "a photo of a clean {}.",
    "a black and white photo of a {}.", "a close-up photo of the {}.", "a snapshot of a {}.",
    "an image of a {}.", "a picture of a {}.", "a picture of the {}.", "a photograph of a {}.",
    "a photo showing a {}.", "a centered photo of a {}.", "a photo taken outdoors of a {}.",
    "a photo taken indoors of a {}.", "a detailed photo of a {}.", "a {} in a photo.",
    "there is a {} in this photo.", "this is a photo of a {}.", "a photo of something: {}.",
)


@dataclass
class ZeroShotResult:
    ranked: list                           # [(label, score)] best first
    cosines: dict                          # label -> cosine similarity
    score: str                             # "softmax", "sigmoid" or "cosine"
    notices: list = field(default_factory=list)


def parse_labels(labels, encoder=None) -> tuple:
    """(labels, notices): comma/newline separated text or a list; merged duplicates, limits."""
    if isinstance(labels, str):
        items = clean_text(labels, "Labels", max_chars=100_000, allow_empty=True).replace("\n", ",").split(",")
    else:
        items = [clean_text(x, "Label", max_chars=1000, allow_empty=True) for x in labels or []]
    stripped = [x.strip() for x in items if x and x.strip()]
    if not stripped:
        raise InputError("Give at least one label, e.g. 'cat, dog, car'.")
    notices = []
    unique = list(dict.fromkeys(stripped))
    if len(unique) < len(stripped):
        notices.append(f"{len(stripped) - len(unique)} duplicate label(s) merged.")
    if len(unique) > MAX_LABELS:
        raise InputError(f"{len(unique)} labels; the limit is {MAX_LABELS}.")
    if encoder is not None:
        room = encoder.max_text_tokens - 12          # leave room for the template
        cut = []
        for i, label in enumerate(unique):
            ids = encoder.tokenizer(label, add_special_tokens=False)["input_ids"]
            if len(ids) > room:
                unique[i] = encoder.tokenizer.decode(ids[:room]).strip()
                cut.append(label[:30])
        if cut:
            notices.append(f"{len(cut)} label(s) longer than the text encoder's "
                           f"{encoder.max_text_tokens} tokens were cut: {', '.join(cut)}...")
    return unique, notices


def check_template(template) -> str:
    """A template is plain text with exactly one {} where the label goes: no other braces, no
    format fields or specs (users' text never reaches str.format, whose specs such as
    {:a>50000000} build huge strings)."""
    template = clean_text(template, "Template", max_chars=300)
    if template.count("{}") != 1 or template.replace("{}", "", 1).count("{") or \
            template.replace("{}", "", 1).count("}"):
        raise InputError("The template must be plain text with exactly one {} where the label "
                         "goes and no other braces, e.g. 'a photo of {}.'")
    return template


def fill_template(template: str, label: str) -> str:
    """The prompt for one label (plain substitution; labels may hold braces)."""
    return template.replace("{}", label, 1)


def label_embeddings(encoder, labels: list, templates: tuple) -> torch.Tensor:
    """(L, D): per label, the normalised mean of its normalised template embeddings."""
    texts = [fill_template(t, label) for label in labels for t in templates]
    emb = encoder.text_embeddings_cached(texts).view(len(labels), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def zero_shot(encoder, image, labels, template: str = "a photo of {}.", ensemble: bool = False,
              score: str = "softmax", threshold: float | None = None,
              templates=None) -> ZeroShotResult:
    return zero_shot_batch(encoder, [image], labels, template, ensemble, score, threshold,
                           templates)[0]


def zero_shot_batch(encoder, images: list, labels, template: str = "a photo of {}.",
                    ensemble: bool = False, score: str = "softmax",
                    threshold: float | None = None, templates=None) -> list:
    """One ZeroShotResult per image; the label embeddings are computed once.
    `templates`: an ensemble of your own (overrides `template` and `ensemble`)."""
    if score not in SCORES:
        raise InputError(f"score must be one of {', '.join(SCORES)}, not {score!r}.")
    labels, notices = parse_labels(labels, encoder)
    if templates:
        templates = tuple(check_template(t) for t in templates)
    elif ensemble:
        templates = ENSEMBLE
    else:
        templates = (check_template(template),)
    text = label_embeddings(encoder, labels, templates)                   # (L, D)
    image = encoder.encode_images(images)                                 # (N, D)
    cos = image @ text.T                                                  # (N, L)
    logits = encoder.logit_scale * cos
    if score == "softmax":
        scores = logits.softmax(-1)
    elif score == "sigmoid":
        # centre on each image's mean logit: raw CLIP logits are all large and positive
        scores = torch.sigmoid(logits - logits.mean(-1, keepdim=True))
    else:
        scores = cos
    results = []
    for n in range(len(images)):
        ranked = sorted(zip(labels, scores[n].tolist()), key=lambda x: -x[1])
        cosines = dict(zip(labels, cos[n].tolist()))
        result = ZeroShotResult(ranked, cosines, score, list(notices))
        if threshold is not None and max(cosines.values()) < float(threshold):
            result.ranked = [(NONE_LABEL, 1.0 - ranked[0][1] if score != "cosine" else
                              float(threshold))] + ranked
            result.notices.append(f"No label reaches cosine {float(threshold):.2f}: "
                                  f"'{NONE_LABEL}'.")
        results.append(result)
    return results
