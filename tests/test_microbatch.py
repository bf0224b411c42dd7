"""Micro-batching: requests that arrive together share one call, and each gets back exactly
its own results (equal to running alone); a bad request fails alone."""

import threading
import time

import pytest
import torch

from mmcore.microbatch import MicroBatcher


def wait_until(condition, limit=60.0):
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end
        time.sleep(0.002)


def test_requests_gather_while_a_batch_runs_and_split_back():
    gate, calls = threading.Event(), []

    def double(items):
        calls.append(list(items))
        if len(calls) == 1:
            gate.wait(60)                  # the first batch runs until the test lets it go
        if "bad" in items:
            raise ValueError("bad item")
        return [2 * x for x in items]

    batcher = MicroBatcher(double, max_batch=16, max_wait=0.001)
    results, errors = {}, {}

    def call(key, items):
        try:
            results[key] = batcher(items)
        except ValueError as exc:
            errors[key] = exc

    first = threading.Thread(target=call, args=("first", [1]))
    first.start()
    wait_until(lambda: len(calls) == 1)
    others = [threading.Thread(target=call, args=(k, v)) for k, v in
              [("a", [2, 3]), ("b", [4]), ("c", ["bad"]), ("d", [5, 6, 7])]]
    for t in others:
        t.start()
    wait_until(lambda: batcher._open is not None and len(batcher._open.parts) == 4)
    gate.set()
    for t in [first] + others:
        t.join()
    assert results == {"first": [2], "a": [4, 6], "b": [8], "d": [10, 12, 14]}
    assert set(errors) == {"c"}
    # one batch alone, then the four that gathered together (which failed on "bad" and
    # were rerun one by one)
    assert calls[0] == [1] and sorted(map(str, calls[1])) == sorted(map(str, [2, 3, 4, "bad",
                                                                              5, 6, 7]))
    assert batcher.batches == 2


def test_a_lone_request_runs_at_once():
    seen = []
    batcher = MicroBatcher(lambda items: seen.append(len(items)) or items, max_wait=10.0)
    assert batcher([1, 2]) == [1, 2] and seen == [2]


@pytest.fixture(params=["tiny", "offline"])
def encoder(request):
    kit = request.getfixturevalue(f"{request.param}_kit")
    enc = kit.encoder()
    yield enc
    enc._batchers = {}


def test_encoders_batched_across_requests_equal_unbatched(encoder, chelsea):
    from PIL import Image
    from skimage import data

    photos = [chelsea, Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()),
              Image.fromarray(data.rocket())]
    texts = ["a photo of a cat", "an astronaut", "a cup of coffee on a table", "a rocket"]
    alone_images = torch.cat([encoder.encode_images([p]) for p in photos])
    alone_texts = torch.cat([encoder.encode_texts([t]) for t in texts])
    encoder.micro_batch(max_wait=0.05)
    got_images, got_texts = {}, {}
    gate = threading.Event()
    batcher = encoder._batchers["images"]
    real = batcher.fn

    def held(items):                       # hold the first batch so the rest gather
        if not gate.is_set():
            gate.wait(60)
        return real(items)

    batcher.fn = held
    threads = [threading.Thread(target=lambda i=i: got_images.__setitem__(
        i, encoder.encode_images([photos[i]]))) for i in range(4)]
    threads += [threading.Thread(target=lambda i=i: got_texts.__setitem__(
        i, encoder.encode_texts([texts[i]]))) for i in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: batcher._open is not None and len(batcher._open.parts) == 3)
    gate.set()
    for t in threads:
        t.join()
    assert batcher.batches == 2                        # 1 alone, then 3 together
    torch.testing.assert_close(torch.cat([got_images[i] for i in range(4)]), alone_images,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([got_texts[i] for i in range(4)]), alone_texts,
                               atol=1e-5, rtol=1e-4)


def test_fill_mask_forwards_batched_across_requests_equal_unbatched(tiny_kit):
    from mmcore import fill_mask

    loaded = tiny_kit.model("masked_lm")
    texts = ["The capital of France is [MASK].", "A [MASK] runs across the green grass.",
             "The opposite of hot is [MASK].", "She opened the [MASK] and walked in.",
             "Water boils at one hundred [MASK] ."]
    alone = [fill_mask.fill(loaded, t, 5) for t in texts]
    fill_mask.fill(loaded, texts[0], 5, batched=True)              # makes the batcher
    batcher = loaded._batcher
    real, gate = batcher.fn, threading.Event()

    def held(items):                       # hold the first batch so the rest gather
        if not gate.is_set():
            gate.wait(60)
        return real(items)

    batcher.fn, got, before = held, {}, batcher.batches
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(
        i, fill_mask.fill(loaded, texts[i], 5, batched=True))) for i in range(len(texts))]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: batcher._open is not None and len(batcher._open.parts) == 4)
        gate.set()
        for t in threads:
            t.join()
    finally:
        batcher.fn = real
    assert batcher.batches - before == 2                # 1 alone, then 4 in one forward
    for want, have in zip(alone, [got[i] for i in range(len(texts))]):
        assert [[r["token_str"] for r in m] for m in have.per_mask] == \
            [[r["token_str"] for r in m] for m in want.per_mask]
        for m_have, m_want in zip(have.per_mask, want.per_mask):
            for a, b in zip(m_have, m_want):
                assert abs(a["score"] - b["score"]) < 1e-5
        assert [j["tokens"] for j in have.joint] == [j["tokens"] for j in want.joint]


# ------------------------------------------------ NSP and the causal LM's scoring (serving)

def gathered(batcher, calls: list, together: int) -> list:
    """Run `calls` in threads; the first batch is held until `together` more requests wait
    in the next one, so they share it. Their results, in order."""
    real, gate, got = batcher.fn, threading.Event(), {}
    batcher.max_batch = 10_000

    def held(items):
        if not gate.is_set():
            gate.wait(60)
        return real(items)

    def call(i):
        try:
            got[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - reported below
            got[i] = exc

    batcher.fn = held
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: batcher._open is not None and len(batcher._open.parts) >= together)
        gate.set()
        for t in threads:
            t.join()
    finally:
        batcher.fn = real
    for r in got.values():
        if isinstance(r, Exception):
            raise r
    return [got[i] for i in range(len(calls))]


PAIRS = [("It rained all night.", "The streets were wet in the morning."),
         ("She bought flour and eggs.", "Then she baked a cake."),
         ("The train was late.", "Whales migrate thousands of kilometres."),
         ("He opened the window.", "Fresh air filled the room at once."),
         ("I lost my keys.", "The moon orbits the Earth.")]
FILLS = ["The capital of France is [MASK].", "A [MASK] runs across the green grass.",
         "She opened the [MASK] and walked in.", "The opposite of hot is [MASK]."]


def assert_fills_equal(have, want):
    assert [[r["token_str"] for r in m] for m in have.per_mask] == \
        [[r["token_str"] for r in m] for m in want.per_mask]
    for m_have, m_want in zip(have.per_mask, want.per_mask):
        for a, b in zip(m_have, m_want):
            assert abs(a["score"] - b["score"]) < 1e-5
    assert [j["tokens"] for j in have.joint] == [j["tokens"] for j in want.joint]


def test_nsp_head_pairs_batched_across_requests_when_serving(tiny_kit):
    from mmcore import kits

    alone = [tiny_kit.next_sentence(a, b) for a, b in PAIRS]
    served = kits.Kit("tiny", tiny_kit.specs, precision=tiny_kit.precision).serve()
    head = served.model("next_sentence")
    assert head is tiny_kit.model("next_sentence")              # the same loaded model
    served.next_sentence(*PAIRS[0])                              # makes the batcher
    batcher, before = head._batcher, head._batcher.batches
    got = gathered(batcher, [lambda a=a, b=b: served.next_sentence(a, b) for a, b in PAIRS], 4)
    assert batcher.batches - before == 2 and batcher.peak == 4  # 1 alone, then 4 together
    assert got == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("task", ["fill_mask", "next_sentence"])
def test_causal_lm_scoring_batched_across_requests(tiny_kit, task):
    """The offline kit's approximations, on the tiny GPT-2 (learned absolute positions:
    a wrong position id would change every score)."""
    lm = tiny_kit.model("causal_lm")
    if task == "fill_mask":
        calls = [lambda t=t: lm.fill_mask(t, 5, []) for t in FILLS]
        batched = [lambda t=t: lm.fill_mask(t, 5, [], batched=True) for t in FILLS]
    else:
        calls = [lambda p=p: lm.next_sentence(*p) for p in PAIRS]
        batched = [lambda p=p: lm.next_sentence(*p, batched=True) for p in PAIRS]
    alone = [c() for c in calls]
    batched[0]()                                                 # makes the batcher
    scorer = lm.scorer()
    got = gathered(scorer, batched, len(batched) - 1)
    assert scorer.peak >= len(batched) - 1                       # their rows in one forward
    if task == "fill_mask":
        for have, want in zip(got, alone):
            assert_fills_equal(have, want)
    else:
        assert got == pytest.approx(alone, abs=1e-5)


def test_offline_kit_fill_mask_and_nsp_share_forwards_when_serving(offline_kit):
    from mmcore import kits

    lm = offline_kit.model("causal_lm")
    alone_fill = [offline_kit.fill_mask_details(t) for t in FILLS[:3]]
    alone_nsp = [offline_kit.next_sentence(a, b) for a, b in PAIRS[:3]]
    assert lm._scorer is None                        # plain Python use: nothing batched
    served = kits.Kit("offline", offline_kit.specs, precision=offline_kit.precision).serve()
    served.next_sentence(*PAIRS[0])
    scorer = lm.scorer()
    got = gathered(scorer, [lambda t=t: served.fill_mask_details(t) for t in FILLS[:3]] +
                   [lambda p=p: served.next_sentence(*p) for p in PAIRS[:3]], 5)
    assert scorer.peak >= 5
    for have, want in zip(got[:3], alone_fill):
        assert_fills_equal(have, want)
    assert got[3:] == pytest.approx(alone_nsp, abs=1e-5)


def test_prefix_runs_and_scores_of_different_requests_share_one_forward(tiny_kit):
    """lm_scoring.run_rows: rows after no prefix, after different prefixes and of both kinds
    in one call give what each gives alone (the caches they leave too)."""
    from mmcore import lm_scoring as L

    lm = tiny_kit.model("causal_lm")
    model, tok = lm.model, lm.tokenizer
    a, b = L.run_prefix(model, tok, "The cat sat on the mat and"), L.run_prefix(model, tok, "Once")
    ids = [L.encode(tok, t) for t in (" then it slept", " upon a time there", " it", " was")]
    rows = [(None, [L.start_id(tok)] + ids[0], "run"), (a, ids[1], "run"), (b, ids[2], "run"),
            (a, ids[0], "score"), (b, ids[1], "score"), (a, ids[3], "score")]
    together = L.run_rows(model, rows)
    for row, got in zip(rows, together):
        want = L.run_rows(model, [row])[0]
        if row[2] == "score":
            assert abs(got[0] - want[0]) < 1e-5
            torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
            continue
        assert got.length == want.length
        torch.testing.assert_close(got.next_logp, want.next_logp, atol=1e-5, rtol=1e-5)
        # the cache it leaves scores what follows as the lone one does
        after = L.score_continuations(model, got, [ids[3], ids[2]])
        assert after == pytest.approx(L.score_continuations(model, want, [ids[3], ids[2]]),
                                      abs=1e-5)
