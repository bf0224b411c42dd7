"""Zero-shot image classification with any dual encoder.

Labels become prompts through a template (or an ensemble of templates, whose normalised text
embeddings are averaged, as in the CLIP paper); the image is compared with each label by
cosine similarity. Scores (`score=`):

- "softmax": softmax over the labels of logit_scale x cosine (what transformers' pipeline
  reports for CLIP); the labels compete, the scores sum to 1.
- "sigmoid": an independent yes/no per label, never affected by the other labels. A model
  trained with a sigmoid loss has its own bias (SigLIP's `logit_bias`): the score is then
  sigmoid(logit_scale x cosine + logit_bias), the model's own probability. Models without
  one (CLIP, ConSE) get sigmoid(logit_scale x (cosine - cosine_0)), where cosine_0 is the
  image's cosine with the template holding no label ("a photo of ."): above 0.5 means the
  label describes the image better than the bare template does.
- "cosine": the raw cosine similarity.

Verdict ("none of these"): with `threshold` (a cosine), "none of these" joins the labels as
one more label whose cosine is exactly the threshold, scored by the same rule. Every score is
increasing in the cosine, so "none of these" ranks first (the `verdict`) exactly when no
label's cosine reaches the threshold; `ranked` stays best first, and a chart of it agrees
with the verdict. With softmax, the scores then sum to 1 over the labels plus "none of these".

Label embeddings are cached per encoder, so a second image with the same labels encodes
only the image. As a transformers pipeline: `preprocess` (inputs checked) -> `forward` (the
embeddings) -> `postprocess` (scores, ranking).
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
    ranked: list                           # [(label, score)] best first ("none of these"
                                           # among them when a threshold is set)
    cosines: dict                          # label -> cosine ("none of these": the threshold)
    score: str                             # "softmax", "sigmoid" or "cosine"
    notices: list = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """The best label, or "none of these" when no label's cosine reaches the threshold."""
        return self.ranked[0][0]


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
    query = preprocess(encoder, labels, template, ensemble, score, threshold, templates)
    image, text = forward(encoder, images, query)
    return postprocess(encoder, query, image, text)


@dataclass
class Query:
    """A checked zero-shot request: what `forward` encodes and `postprocess` scores."""
    labels: list
    templates: tuple
    score: str
    threshold: float | None
    notices: list


def preprocess(encoder, labels, template: str = "a photo of {}.", ensemble: bool = False,
               score: str = "softmax", threshold=None, templates=None) -> Query:
    """Inputs checked early, with clear messages; nothing is encoded yet."""
    if score not in SCORES:
        raise InputError(f"score must be one of {', '.join(SCORES)}, not {score!r}.")
    threshold = check_threshold(threshold)
    labels, notices = parse_labels(labels, encoder)
    if threshold is not None and NONE_LABEL in (x.lower() for x in labels):
        raise InputError(f"'{NONE_LABEL}' is the verdict when no label reaches the "
                         "threshold; it cannot also be a label.")
    if templates:
        templates = tuple(check_template(t) for t in templates)
    elif ensemble:
        templates = ENSEMBLE
    else:
        templates = (check_template(template),)
    return Query(labels, templates, score, threshold, notices)


def forward(encoder, images: list, query: Query) -> tuple:
    """((N, D) image, (L, D) label embeddings): the model's work. Both go through the
    encoder's own batching (micro-batched across requests when serving; labels cached)."""
    text = label_embeddings(encoder, query.labels, query.templates)         # (L, D)
    return encoder.encode_images(images), text                           # (N, D), (L, D)


def postprocess(encoder, query: Query, image: torch.Tensor, text: torch.Tensor) -> list:
    """Scores and rankings from the embeddings, one ZeroShotResult per image."""
    cos = image @ text.T                                                  # (N, L)
    names, threshold = list(query.labels), query.threshold
    if threshold is not None:           # "none of these": one more label, at the threshold
        cos = torch.cat([cos, torch.full((len(image), 1), threshold)], 1)
        names.append(NONE_LABEL)
    if query.score == "softmax":
        scores = (encoder.logit_scale * cos).softmax(-1)
    elif query.score == "sigmoid":
        scores = torch.sigmoid(encoder.logit_scale * cos + _sigmoid_bias(encoder, image,
                                                                          query.templates))
    else:
        scores = cos
    results = []
    for n in range(len(image)):
        # best first; at a tie a real label wins (its cosine "reaches" the threshold)
        order = sorted(range(len(names)), key=lambda i: (-scores[n, i].item(),
                                                         names[i] == NONE_LABEL))
        ranked = [(names[i], float(scores[n, i])) for i in order]
        result = ZeroShotResult(ranked, dict(zip(names, cos[n].tolist())), query.score,
                                list(query.notices))
        if result.verdict == NONE_LABEL:
            result.notices.append(f"No label reaches cosine {threshold:.2f}: "
                                  f"the verdict is '{NONE_LABEL}'.")
        results.append(result)
    return results


def check_threshold(threshold) -> float | None:
    """None (off) or a finite cosine in [-1, 1]."""
    if threshold is None or threshold == "":
        return None
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"threshold must be a number, not {threshold!r}.") from None
    if not -1.0 <= value <= 1.0:          # also refuses NaN
        raise InputError(f"threshold is a cosine: it must be in [-1, 1], not {value}.")
    return value


def _sigmoid_bias(encoder, image: torch.Tensor, templates: tuple) -> torch.Tensor:
    """(N, 1) or scalar bias of the sigmoid score: the model's own `logit_bias` where it has
    one (SigLIP), else -logit_scale x each image's cosine with the label-free template(s)."""
    if getattr(encoder, "logit_bias", None) is not None:
        return torch.tensor(float(encoder.logit_bias))
    bare = [" ".join(t.format("").split()) for t in templates]
    base = F.normalize(encoder.text_embeddings_cached(bare).mean(0), dim=-1)     # (D,)
    return -encoder.logit_scale * (image @ base).unsqueeze(1)
