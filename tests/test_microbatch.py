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
