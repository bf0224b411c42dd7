"""Fill-mask and next-sentence prediction: equal to transformers where the task is the same,
better where the pipeline is weak, and real quality on the offline kit."""

import csv
import math
from pathlib import Path

import pytest
import torch
from transformers import pipeline

import mmcore
from mmcore import fill_mask, lm_scoring, nsp

DATA = Path(__file__).resolve().parent / "data"
SENTENCES = ["The capital of France is [MASK].", "the man went to the [MASK] to buy milk .",
             "[MASK] is a photo of a cat", "a dog runs across the green [MASK] in the park"]


@pytest.fixture(scope="module")
def fill_pipe(tiny_kit):
    loaded = tiny_kit.model("masked_lm")
    return pipeline("fill-mask", model=loaded.model, tokenizer=loaded.tokenizer)


@pytest.mark.parametrize("text", SENTENCES)
def test_single_mask_equals_the_pipeline(tiny_kit, fill_pipe, text):
    ours = tiny_kit.fill_mask(text, top_k=5)
    assert len(ours) == 1
    # the pipeline also shows '##' pieces and specials; ours shows whole words only
    allowed = fill_mask._whole_word_ids(fill_pipe.tokenizer)
    theirs = [r for r in fill_pipe(text, top_k=200) if allowed[r["token"]]][:5]
    assert [r["token_str"] for r in ours[0]] == [r["token_str"] for r in theirs]
    for a, b in zip(ours[0], theirs):
        assert abs(a["score"] - b["score"]) < 1e-5


def test_mask_spellings_are_all_accepted(tiny_kit):
    want = tiny_kit.fill_mask("The capital of France is [MASK].")
    for spelling in ("[mask]", "<mask>", "[Mask]"):
        got = tiny_kit.fill_mask(f"The capital of France is {spelling}.")
        assert [r["token_str"] for r in got[0]] == [r["token_str"] for r in want[0]]
        assert got[0][0]["sequence"] == f"The capital of France is {want[0][0]['token_str']}."


def test_no_word_pieces_are_offered_as_words(tiny_kit):
    for text in SENTENCES:
        for row in tiny_kit.fill_mask(text, top_k=20)[0]:
            assert not row["token_str"].startswith("##")
            assert row["token_str"] not in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")


def test_several_masks_joint_fill_is_ranked_by_joint_probability(tiny_kit):
    text = "the [MASK] of france is [MASK] ."
    result = tiny_kit.fill_mask_details(text, top_k=5)
    assert len(result.per_mask) == 2 and all(len(r) == 5 for r in result.per_mask)
    scores = [j["score"] for j in result.joint]
    assert scores == sorted(scores, reverse=True)
    # each joint score is the chain probability, recomputed here by hand
    loaded = tiny_kit.model("masked_lm")
    model, tok = loaded.model, loaded.tokenizer
    best = result.joint[0]
    ids = tok(text.replace("[MASK]", tok.mask_token))["input_ids"]
    pos = [i for i, t in enumerate(ids) if t == tok.mask_token_id]
    with torch.no_grad():
        first = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    fills = [tok.convert_tokens_to_ids(w) for w in best["tokens"]]
    # most confident mask first
    order = sorted(range(2), key=lambda m: -float(first[pos[m]].max()))
    ids2 = list(ids)
    ids2[pos[order[0]]] = fills[order[0]]
    with torch.no_grad():
        second = model(torch.tensor([ids2])).logits[0].log_softmax(-1)
    expected = math.exp(float(first[pos[order[0]], fills[order[0]]]) +
                        float(second[pos[order[1]], fills[order[1]]]))
    assert abs(best["score"] - expected) < 1e-5
    assert best["sequence"] == f"the {best['tokens'][0]} of france is {best['tokens'][1]} ."


def test_targets_score_multi_token_words_over_all_their_tokens(tiny_kit):
    loaded = tiny_kit.model("masked_lm")
    model, tok = loaded.model, loaded.tokenizer
    word = "zebrafinch"
    pieces = tok(word, add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1
    rows = tiny_kit.fill_mask("a photo of a [MASK] .", targets=[word, "cat"])[0]
    got = {r["token_str"]: r["score"] for r in rows}
    # chain rule by hand: replace the mask by len(pieces) masks and fill left to right
    base = tok("a photo of a " + " ".join([tok.mask_token] * len(pieces)) + " .")["input_ids"]
    start = base.index(tok.mask_token_id)
    logp = 0.0
    for j, piece in enumerate(pieces):
        row = base[:start] + pieces[:j] + base[start + j:]
        with torch.no_grad():
            logp += float(model(torch.tensor([row])).logits[0, start + j].log_softmax(-1)[piece])
    assert abs(got[word] - math.exp(logp)) < 1e-6
    single = tiny_kit.fill_mask("a photo of a [MASK] .", top_k=50)[0]
    cat = [r["score"] for r in single if r["token_str"] == "cat"]
    assert not cat or abs(got["cat"] - cat[0]) < 1e-6


def brute_force_joint(model, tok, text: str, words: list) -> list:
    """Every assignment of target words to the masks, scored by the chain rule by hand:
    masks left to right, each word's tokens left to right, the rest still masked."""
    import itertools

    start = tok(text.replace("[MASK]", tok.mask_token))["input_ids"]
    out = []
    for combo in itertools.product(words, repeat=start.count(tok.mask_token_id)):
        row, logp = list(start), 0.0
        for word in combo:
            pieces = tok(word, add_special_tokens=False)["input_ids"]
            pos = row.index(tok.mask_token_id)
            base = row[:pos] + [tok.mask_token_id] * len(pieces) + row[pos + 1:]
            for j, piece in enumerate(pieces):
                probe = base[:pos] + pieces[:j] + base[pos + j:]
                with torch.no_grad():
                    logits = model(torch.tensor([probe])).logits[0, pos + j]
                logp += float(logits.log_softmax(-1)[piece])
            row = row[:pos] + pieces + row[pos + 1:]
        out.append((list(combo), math.exp(logp)))
    return sorted(out, key=lambda x: -x[1])


@pytest.mark.parametrize("words", [["zebrafinch", "cat", "capital"], ["zebrafinch", "quokkas"]])
def test_joint_fill_with_multi_token_targets_equals_brute_force(tiny_kit, words):
    loaded = tiny_kit.model("masked_lm")
    model, tok = loaded.model, loaded.tokenizer
    assert len(tok("zebrafinch", add_special_tokens=False)["input_ids"]) > 1
    assert len(tok("quokkas", add_special_tokens=False)["input_ids"]) > 1
    text = "the [MASK] of france is [MASK] ."
    result = tiny_kit.fill_mask_details(text, top_k=5, targets=", ".join(words))
    want = brute_force_joint(model, tok, text, words)[:5]
    assert all("[UNK]" not in j["tokens"] for j in result.joint)
    assert [j["tokens"] for j in result.joint] == [w for w, _ in want]
    for got, (_, p) in zip(result.joint, want):
        assert abs(got["score"] - p) < 1e-6
    best = result.joint[0]["tokens"]
    assert result.joint[0]["sequence"] == f"the {best[0]} of france is {best[1]} ."


def test_nsp_equals_transformers(tiny_kit):
    loaded = tiny_kit.model("next_sentence")
    model, tok = loaded.model, loaded.tokenizer
    a, b = "the cat sat on the sofa .", "then it fell asleep ."
    with torch.no_grad():
        want = float(model(**tok(a, b, return_tensors="pt")).logits.softmax(-1)[0, 0])
    assert abs(tiny_kit.next_sentence(a, b) - want) < 1e-5


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("   \n", "empty"), ("no mask here", "No mask found"),
    ("[MASK] " * 6, "limit is 5"), ("x" * 1_000_000, "limit is"),
    ("bad \ud800 [MASK]", "lone surrogate"),
])
def test_bad_text_is_rejected_clearly(tiny_kit, text, message):
    with pytest.raises(mmcore.InputError, match=message):
        tiny_kit.fill_mask(text)


@pytest.mark.parametrize("top_k", [float("nan"), float("inf"), "1e400", "five", 0])
def test_bad_top_k_is_rejected_clearly(tiny_kit, top_k):
    with pytest.raises(mmcore.InputError, match="top_k must be"):
        tiny_kit.fill_mask("the [MASK] sat .", top_k=top_k)


def test_bad_nsp_inputs_are_rejected(tiny_kit):
    with pytest.raises(mmcore.InputError, match="empty"):
        tiny_kit.next_sentence("", "b")
    with pytest.raises(mmcore.InputError, match="limit"):
        tiny_kit.next_sentence("a" * 1_000_000, "b")


def test_text_over_the_context_is_cut_around_the_mask(tiny_kit):
    text = "the cat sat . " * 200 + "the capital of france is [MASK] ." + " the end ." * 200
    result = tiny_kit.fill_mask_details(text)
    assert result.notices and "512" in result.notices[0]
    assert len(result.per_mask[0]) == 5
    far = "[MASK] " + "word " * 600 + "[MASK]"
    with pytest.raises(mmcore.InputError, match="must fit"):
        tiny_kit.fill_mask(far)


# ---------------------------------------------------------------- the offline kit, for real

def probes():
    with open(DATA / "fill_mask_probes.tsv", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_offline_probe_accuracy(offline_kit):
    rows = probes()
    assert len(rows) >= 40
    hits = sum(offline_kit.fill_mask(r["sentence"], top_k=1)[0][0]["token_str"].lower()
               == r["answer"].lower() for r in rows)
    print(f"offline fill-mask top-1: {hits}/{len(rows)}")
    # 42/50 before the right context proposed and scored words too (issue 12), 44/50 after
    assert hits / len(rows) >= 0.86


def test_offline_targets_and_several_masks(offline_kit):
    rows = offline_kit.fill_mask("The capital of France is [MASK].",
                                 targets="London, Paris, Berlin")[0]
    assert rows[0]["token_str"] == "Paris"
    assert abs(sum(r["score"] for r in rows) - 1) < 1e-6      # renormalised over candidates
    result = offline_kit.fill_mask_details("The capital of [MASK] is [MASK].", top_k=5)
    assert result.backend == "causal_lm" and len(result.per_mask) == 2
    assert result.joint[0]["sequence"].startswith("The capital of ")
    assert "[MASK]" not in result.joint[0]["sequence"]


def test_offline_two_masks_give_top_k_words_per_mask(offline_kit):
    result = offline_kit.fill_mask_details("The [MASK] of France is [MASK].", top_k=5)
    assert [len(rows) for rows in result.per_mask] == [5, 5]
    for m, rows in enumerate(result.per_mask):
        scores = [r["score"] for r in rows]
        assert scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-9
        assert len({r["token_str"] for r in rows}) == 5
        for r in rows:      # a marginal covers at least the joint fills shown with that word
            shown = sum(j["score"] for j in result.joint if j["tokens"][m] == r["token_str"])
            assert r["score"] >= shown - 1e-9


@pytest.mark.parametrize("text, want", [
    ("The [MASK] of France is [MASK].", "The capital of France is Paris."),
    ("[MASK] is the capital of France.", "Paris is the capital of France."),
])
def test_offline_mask_with_little_left_context_uses_the_right(offline_kit, text, want):
    assert offline_kit.fill_mask_details(text, top_k=5).joint[0]["sequence"] == want


def test_offline_words_go_on_by_the_distribution_right_after_them(monkeypatch):
    """Whether a proposed word goes on ("luke" -> "lukewarm") is read from the model's
    next-token distribution right after the word. It had been read after the text that
    follows the word, which grew "L" into "LA" (as in "L.A") and "the" into "theday"."""
    kit = mmcore.load_kit("offline", precision="exact")
    loaded = kit.model("masked_lm")
    model, tok = loaded.scoring_model, loaded.tokenizer
    seen = []
    real = fill_mask.CausalFill.extensions

    def spy(self, word, next_logp, *rest):
        seen.append((word, next_logp.clone()))
        return real(self, word, next_logp, *rest)

    monkeypatch.setattr(fill_mask.CausalFill, "extensions", spy)
    result = kit.fill_mask("The opposite of hot is [MASK].", top_k=5)[0]
    prefix = [lm_scoring.start_id(tok)] + lm_scoring.encode(tok, "The opposite of hot is")
    assert len(seen) >= 12
    with torch.inference_mode():
        for word, got in seen:
            ids = torch.tensor([prefix + lm_scoring.encode(tok, " " + word)])
            want = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
            assert torch.allclose(got, want, atol=1e-3), word
    assert "lukewarm" in [r["token_str"] for r in result]


def test_offline_nsp_prefers_real_pairs(offline_kit):
    first = "The printer in our office stopped working again."
    real = offline_kit.next_sentence(first, "Someone called the technician to repair it.")
    fake = offline_kit.next_sentence(first, "Whales migrate thousands of kilometres each year.")
    assert 0 <= fake < real <= 1
    assert offline_kit.next_sentence(first, "Someone called the technician to repair it.") == real


def test_offline_nsp_calibration_holds_on_the_labelled_pairs(offline_kit):
    import json

    entry = json.loads(nsp.CALIBRATION.read_text())[offline_kit.spec("next_sentence").name]
    pairs = nsp.labelled_pairs()
    assert entry["pairs"] == len(pairs) >= 80
    assert entry["leave_one_out_accuracy"] >= 0.7
    probs = [offline_kit.next_sentence(a, b) for a, b, _ in pairs]
    acc = sum((p > 0.5) == bool(y) for p, (_, _, y) in zip(probs, pairs)) / len(pairs)
    assert abs(acc - entry["train_accuracy"]) < 1e-9     # the shipped fit is current
    assert acc >= 0.75
