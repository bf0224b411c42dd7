"""Dual encoders and zero-shot classification: equal to the transformers pipeline on CLIP,
cached label embeddings, clear limits, and real quality on real photos (offline kit)."""

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from transformers import pipeline

import mmcore
from mmcore import InputError
from mmcore import zero_shot as Z

DATA = Path(__file__).resolve().parent / "data"
LABELS = ["cat", "dog", "rocket", "cup of coffee", "astronaut"]


def photo(name: str) -> Image.Image:
    arr = getattr(data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return Image.fromarray(arr)


def test_probabilities_equal_the_pipeline(tiny_kit, chelsea):
    enc = tiny_kit.model("dual_encoder")
    pipe = pipeline("zero-shot-image-classification", model=enc.model,
                    tokenizer=enc.processor.tokenizer,
                    image_processor=enc.processor.image_processor)
    for image in (chelsea, photo("rocket")):
        want = {r["label"]: r["score"] for r in
                pipe(image, candidate_labels=LABELS, hypothesis_template="a photo of {}.")}
        got = dict(tiny_kit.zero_shot(image, LABELS, template="a photo of {}."))
        assert got.keys() == want.keys()
        for label in LABELS:
            assert abs(got[label] - want[label]) < 1e-4


def test_label_embeddings_are_cached(tiny_kit, chelsea, monkeypatch):
    enc = tiny_kit.encoder()
    enc._text_cache.clear()
    calls = []
    real = enc._texts
    monkeypatch.setattr(enc, "_texts", lambda texts: calls.append(len(texts)) or real(texts))
    first = tiny_kit.zero_shot(chelsea, LABELS)
    second = tiny_kit.zero_shot(photo("coffee"), LABELS)
    assert calls == [len(LABELS)]                      # the second image encoded no text
    assert first != second


def test_ensemble_is_the_mean_of_template_embeddings(tiny_kit, chelsea):
    enc = tiny_kit.encoder()
    result = Z.zero_shot(enc, chelsea, LABELS, ensemble=True, score="cosine")
    image = enc.encode_images([chelsea])[0]
    for label in LABELS:
        texts = enc.encode_texts([t.format(label) for t in Z.ENSEMBLE])
        mean = torch.nn.functional.normalize(texts.mean(0), dim=0)
        assert abs(result.cosines[label] - float(image @ mean)) < 1e-5
    assert len(Z.ENSEMBLE) >= 24


def test_scores_and_threshold(tiny_kit, chelsea):
    enc = tiny_kit.encoder()
    cos = Z.zero_shot(enc, chelsea, LABELS, score="cosine")
    image, text = enc.encode_images([chelsea])[0], enc.encode_texts(
        [f"a photo of {x}." for x in LABELS])
    for label, value in cos.ranked:
        assert abs(value - float(image @ text[LABELS.index(label)])) < 1e-5
    sig = Z.zero_shot(enc, chelsea, LABELS, score="sigmoid")
    assert all(0 < v < 1 for _, v in sig.ranked)
    none = Z.zero_shot(enc, chelsea, LABELS, threshold=1.0)
    assert none.ranked[0][0] == none.verdict == Z.NONE_LABEL and none.notices


class FixedEncoder:
    """A dual encoder with fixed embeddings, for hand computations."""

    def __init__(self, image, texts: dict, logit_scale=10.0, logit_bias=None):
        self.image, self.texts = image, texts
        self.logit_scale, self.logit_bias = logit_scale, logit_bias
        self.max_text_tokens = 77
        self.tokenizer = lambda text, **_: {"input_ids": text.split()}

    def encode_images(self, images):
        return self.image.expand(len(images), -1)

    def text_embeddings_cached(self, texts):
        return torch.stack([self.texts[t] for t in texts])


def unit(*xs):
    return torch.nn.functional.normalize(torch.tensor(xs, dtype=torch.float32), dim=-1)


def fixed_encoder(logit_bias=None):
    texts = {"a photo of cat.": unit(1.0, 0.2, 0.0), "a photo of dog.": unit(0.3, 1.0, 0.0),
             "a photo of car.": unit(0.0, 0.1, 1.0), "a photo of .": unit(0.5, 0.5, 0.5)}
    return FixedEncoder(unit(1.0, 0.0, 0.1), texts, 10.0, logit_bias)


def test_sigmoid_uses_the_models_own_scale_and_bias():
    enc = fixed_encoder(logit_bias=-6.0)              # SigLIP-style
    got = dict(Z.zero_shot(enc, "img", "cat, dog", template="a photo of {}.",
                           score="sigmoid").ranked)
    for label in ("cat", "dog"):
        cos = float(enc.image @ enc.texts[f"a photo of {label}."])
        assert abs(got[label] - 1 / (1 + math.exp(-(10.0 * cos - 6.0)))) < 1e-6


def test_sigmoid_without_a_bias_is_independent_of_the_other_labels():
    enc = fixed_encoder()
    two = dict(Z.zero_shot(enc, "img", "cat, dog", score="sigmoid").ranked)
    three = dict(Z.zero_shot(enc, "img", "cat, dog, car", score="sigmoid").ranked)
    base = float(enc.image @ enc.texts["a photo of ."])     # the label-free template
    for label in ("cat", "dog"):
        assert abs(two[label] - three[label]) < 1e-9
        cos = float(enc.image @ enc.texts[f"a photo of {label}."])
        assert abs(two[label] - 1 / (1 + math.exp(-10.0 * (cos - base)))) < 1e-6


@pytest.mark.parametrize("score", Z.SCORES)
@pytest.mark.parametrize("threshold", [0.99, 0.5, 0.0])
def test_none_of_these_is_one_verdict_best_first(score, threshold):
    """'none of these' is a label at the threshold's cosine, scored like the others: the
    ranking stays best first and its top is the verdict, whatever the score type."""
    enc = fixed_encoder()
    result = Z.zero_shot(enc, "img", "cat, dog, car", score=score, threshold=threshold)
    cos = {lab: float(enc.image @ enc.texts[f"a photo of {lab}."]) for lab in
           ("cat", "dog", "car")}
    reached = [lab for lab in cos if cos[lab] >= threshold]
    want = max(reached, key=cos.get) if reached else Z.NONE_LABEL
    assert result.verdict == result.ranked[0][0] == want
    values = [v for _, v in result.ranked]
    assert values == sorted(values, reverse=True)
    order = [lab for lab, _ in result.ranked]
    assert order == sorted(cos, key=cos.get, reverse=True)[:len(reached)] + [Z.NONE_LABEL] + \
        sorted(cos, key=cos.get, reverse=True)[len(reached):]
    if score == "softmax":            # by hand: the threshold is one more logit
        logits = {**{k: 10.0 * v for k, v in cos.items()}, Z.NONE_LABEL: 10.0 * threshold}
        norm = sum(math.exp(v) for v in logits.values())
        for lab, value in result.ranked:
            assert abs(value - math.exp(logits[lab]) / norm) < 1e-6
    if want == Z.NONE_LABEL:
        assert any(Z.NONE_LABEL in n for n in result.notices)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), 2.0, "x"])
def test_bad_threshold_is_rejected(threshold):
    with pytest.raises(mmcore.InputError, match="threshold"):
        Z.zero_shot(fixed_encoder(), "img", "cat, dog", threshold=threshold)


def test_batched_image_encoding_equals_one_by_one(tiny_kit, chelsea):
    images = [chelsea, photo("rocket"), photo("coffee")]
    together = tiny_kit.encode_images(images)
    alone = torch.cat([tiny_kit.encode_images([im]) for im in images])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("kind", ["tower", "clip"])
def test_many_photos_decode_on_every_core_with_the_same_embeddings(tiny_kit, offline_kit,
                                                                   chelsea, tmp_path, kind,
                                                                   monkeypatch):
    """A gallery's photos are decoded and resized on several threads at once (Pillow lets
    go of the GIL), the model's forwards stay on the caller's thread, and the embeddings
    are those of decoding on one thread, bit for bit (and the one-by-one ones, up to the
    batch's rounding); one bad file still fails the call with its name."""
    from mmcore import dual_encoder, lanes

    if lanes.cpu_cores() < 2:
        pytest.skip("one core: nothing to decode beside")
    enc = offline_kit.encoder() if kind == "tower" else tiny_kit.encoder()
    paths = []
    for i, name in enumerate(["rocket", "coffee", "astronaut", "chelsea"] * 3):
        paths.append(tmp_path / f"{i}.jpg")
        photo(name).save(paths[-1])
    alone = torch.cat([enc.encode_images([p]) for p in paths])
    with monkeypatch.context() as one_core:
        one_core.setattr(lanes, "cpu_cores", lambda: 1)
        serial = enc.encode_images(paths)
    threads, inner = set(), dual_encoder.load_image

    def watched(src):
        threads.add(threading.get_ident())
        return inner(src)

    monkeypatch.setattr(dual_encoder, "load_image", watched)
    together = enc.encode_images(paths)
    assert len(threads - {threading.get_ident()}) >= 2
    assert torch.equal(together, serial)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    (tmp_path / "bad.jpg").write_bytes(b"not a photo")
    with pytest.raises(mmcore.InputError, match="bad.jpg"):
        enc.encode_images(paths[:5] + [tmp_path / "bad.jpg"] + paths[5:])


@pytest.mark.parametrize("labels, message", [
    ("", "at least one label"), (" , ,\n", "at least one label"),
    ([f"l{i}" for i in range(1001)], "limit is 1000"),
])
def test_bad_labels(tiny_kit, chelsea, labels, message):
    with pytest.raises(mmcore.InputError, match=message):
        tiny_kit.zero_shot(chelsea, labels)


def test_duplicates_merged_and_long_labels_cut(tiny_kit, chelsea):
    result = tiny_kit.zero_shot_details([chelsea], "cat, dog, cat, " + "very " * 200 + "long")[0]
    assert any("duplicate" in n for n in result.notices)
    assert any("cut" in n for n in result.notices)
    assert len(result.ranked) == 3


def test_bad_template_and_bad_image(tiny_kit, chelsea, tmp_path):
    with pytest.raises(mmcore.InputError, match="exactly one {}"):
        tiny_kit.zero_shot(chelsea, LABELS, template="a photo")
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(mmcore.InputError, match="not an image"):
        tiny_kit.zero_shot(tmp_path / "x.png", LABELS)


def test_offline_kit_on_real_photos(offline_kit):
    cases = json.loads((DATA / "zero_shot_photos.json").read_text())
    assert len(cases) >= 6 and all(len(labels) >= 5 for labels in cases.values())
    for name, labels in cases.items():
        for ensemble in (False, True):
            top = offline_kit.zero_shot(photo(name), labels, ensemble=ensemble)[0][0]
            assert top == labels[0], (name, ensemble, top)


def test_conse_step_zero_is_the_convex_combination(offline_kit, chelsea):
    """The tower's image embedding equals ConSE computed by hand."""
    from mmcore import dual_encoder as de

    enc = offline_kit.encoder()
    with torch.no_grad():
        probs = enc.image_model(enc.transform(chelsea).unsqueeze(0)).softmax(-1)[0]
    top = probs.topk(de.CONSE_TOP_T)
    classes = de.class_embeddings(enc.text_model, enc.tokenizer, enc.class_names)
    by_hand = torch.nn.functional.normalize(
        (top.values.unsqueeze(1) * classes[top.indices]).sum(0) / top.values.sum(), dim=0)
    torch.testing.assert_close(enc.encode_images([chelsea])[0], by_hand, rtol=0, atol=1e-5)


def test_tower_from_config_saves_and_loads_as_safetensors(tmp_path, chelsea):
    from mmcore import dual_encoder as de, tiny

    cfg = de.TowerConfig(image_backbone="resnet10t", text_model=str(tiny.folder("bert")),
                         embed_dim=16)
    torch.manual_seed(0)             # resnet10t has no local weights: same random init twice
    enc = de.build_tower(cfg)
    with torch.no_grad():
        enc.image_projection.weight.normal_()
        enc.log_logit_scale.fill_(3.0)
    enc.save(tmp_path / "head", part="projections")
    assert {p.name for p in (tmp_path / "head").iterdir()} == {"head.safetensors",
                                                               "tower_config.json"}
    torch.manual_seed(0)
    again = de.load_encoder(tmp_path / "head")
    assert again.identity.split(":")[-1] == enc.identity.split(":")[-1]
    torch.testing.assert_close(again.encode_images([chelsea]), enc.encode_images([chelsea]))
    torch.testing.assert_close(again.encode_texts(["a cat"]), enc.encode_texts(["a cat"]))
    assert again.encode_images([chelsea]).shape == (1, 16)
    assert abs(again.logit_scale - float(torch.tensor(3.0).exp())) < 1e-4


@pytest.mark.parametrize("template", ["{{}}{:a>50000000}", "{} and {}", "{0} {1}", "{}{x}",
                                      "{:>9}", "no slot", "{", "a {} }"])
def test_templates_are_plain_text_with_exactly_one_slot(tiny_kit, chelsea, template):
    with pytest.raises(InputError, match="exactly one"):
        tiny_kit.zero_shot(chelsea, LABELS, template=template)


def test_labels_with_braces_are_substituted_not_formatted(tiny_kit):
    assert Z.fill_template("a photo of {}.", "{0} {:>99}") == "a photo of {0} {:>99}."


def test_the_label_cache_is_an_lru_bounded_by_bytes(tiny_kit, chelsea):
    enc = tiny_kit.encoder()
    enc._text_cache.clear()
    old = enc._text_cache.max_bytes
    try:
        enc._text_cache.max_bytes = 8_000
        for n in range(5):
            labels = [f"thing {n} {i}" for i in range(60)]
            tiny_kit.zero_shot(chelsea, labels)
            assert enc._text_cache.nbytes <= 8_000
        recent = "a photo of thing 4 59."
        assert recent in enc._text_cache and "a photo of thing 0 0" not in enc._text_cache
    finally:
        enc._text_cache.max_bytes = old
        enc._text_cache.clear()
