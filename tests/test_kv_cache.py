"""The KV cache layer that appends in place (`mmcore.kv_cache`): the same keys and values as
transformers' DynamicLayer, whatever replaces them from outside, and no copy of the whole
cache per decode step, in batch-1 generation and in the scheduler's batch. (That outputs
stay equal is checked where they are made: greedy against `model.generate`, batched
against batch 1.)"""

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from mmcore import generation as G
from mmcore import kv_cache
from mmcore import serving as S
from mmcore.kv_cache import MIN_ROOM, RoomyLayer, room, with_room
from test_generation import hf_tokens, ours_tokens
from test_serving import together


@pytest.fixture(autouse=True)
def in_place_at_any_size(monkeypatch):
    """The tiny shapes here are below the size from which layers append in place; and, as
    in mmcore's decoding, autograd is off (with it on, layers append by cat)."""
    monkeypatch.setattr(kv_cache, "IN_PLACE_FROM", 0)
    with torch.no_grad():
        yield


def both(ref, ours, n, rows=2):
    k, v = torch.randn(rows, 3, n, 4), torch.randn(rows, 3, n, 4)
    a, b = ref.update(k, v), ours.update(k, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(ref.keys, ours.keys) and torch.equal(ref.values, ours.values)
    assert ours.get_seq_length() == ref.get_seq_length()


def test_it_holds_what_dynamic_layer_holds_across_its_room():
    torch.manual_seed(0)
    ref, ours = DynamicLayer(), RoomyLayer()
    for n in [5] + [1] * (3 * MIN_ROOM) + [7, 1, 1]:      # a prompt, steps, a chunk, steps
        both(ref, ours, n)
    assert ours.get_seq_length() == 5 + 3 * MIN_ROOM + 9


def test_it_follows_keys_replaced_from_outside():
    """What the scheduler does to a batch's layers: keep some rows, trim leading padding
    columns, and what transformers may do: crop, reset."""
    torch.manual_seed(1)
    ref, ours = DynamicLayer(), RoomyLayer()
    both(ref, ours, 6, rows=3)
    both(ref, ours, 1, rows=3)
    idx = torch.tensor([0, 2])
    ref.batch_select_indices(idx)
    ours.batch_select_indices(idx)
    both(ref, ours, 1)
    for layer in (ref, ours):                         # serving._trim
        layer.keys, layer.values = layer.keys[..., 2:, :], layer.values[..., 2:, :]
    both(ref, ours, 1)
    ref.crop(-3)
    ours.crop(-3)
    both(ref, ours, 1)
    both(ref, ours, 2)
    ref.reset()
    ours.reset()
    both(ref, ours, 4, rows=1)


def test_what_it_returned_stays_as_it_was():
    """It hands out views of its buffers: later appends, a crop or a row selection must not
    change a view returned before."""
    torch.manual_seed(3)
    layer = RoomyLayer()
    layer.update(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))
    keys, values = layer.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
    saved = keys.clone(), values.clone()
    for _ in range(MIN_ROOM + 3):
        layer.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
    layer.crop(-4)
    layer.update(torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4))
    layer.batch_select_indices(torch.tensor([1]))
    layer.update(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    assert torch.equal(keys, saved[0]) and torch.equal(values, saved[1])


def test_values_replaced_alone_are_followed_too():
    torch.manual_seed(4)
    ref, ours = DynamicLayer(), RoomyLayer()
    both(ref, ours, 6)
    both(ref, ours, 1)
    for layer in (ref, ours):
        layer.values = layer.values * 2
    both(ref, ours, 1)
    both(ref, ours, 1)


def test_states_that_do_not_fit_are_handled_as_dynamic_layer_handles_them():
    torch.manual_seed(5)
    for layer in (DynamicLayer(), RoomyLayer()):     # other rows: the same error
        layer.update(torch.randn(4, 3, 6, 4), torch.randn(4, 3, 6, 4))
        layer.update(torch.randn(4, 3, 1, 4), torch.randn(4, 3, 1, 4))
        with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
            layer.update(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    ref, ours = DynamicLayer(), RoomyLayer()        # another dtype: promoted, as by cat
    both(ref, ours, 6)
    both(ref, ours, 1)
    k, v = torch.randn(2, 3, 1, 4, dtype=torch.float64), torch.randn(2, 3, 1, 4)
    a, b = ref.update(k, v), ours.update(k, v)
    assert a[0].dtype == b[0].dtype == torch.float64 and torch.equal(a[0], b[0])


def test_with_autograd_on_it_appends_by_cat():
    layer = RoomyLayer()
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    with torch.enable_grad():
        keys, _ = layer.update(x * 1, x * 2)
        keys, values = layer.update(x[..., :1, :] * 3, x[..., :1, :] * 4)
        (keys.sum() + values.sum()).backward()
    assert layer._key_buffer is None and x.grad is not None


def test_leaving_rows_lets_go_of_the_buffers_at_once():
    layer = RoomyLayer()
    with torch.inference_mode():
        layer.update(torch.randn(4, 3, 6, 4), torch.randn(4, 3, 6, 4))
        layer.update(torch.randn(4, 3, 1, 4), torch.randn(4, 3, 1, 4))
        assert layer._key_buffer is not None
        layer.batch_select_indices(torch.tensor([0, 2]))
    assert layer._key_buffer is None and layer._keys_view is None
    assert layer.keys.shape == (2, 3, 7, 4)


def test_its_room_is_bounded():
    assert room(10) == MIN_ROOM and room(8 * MIN_ROOM) == MIN_ROOM and room(4000) == 500
    layer = RoomyLayer()
    layer.update(torch.zeros(1, 2, 400, 8), torch.zeros(1, 2, 400, 8))
    assert layer._key_buffer.shape[-2] == 400 + room(400)


def test_a_small_cache_appends_by_cat_and_a_large_one_in_place(monkeypatch):
    monkeypatch.setattr(kv_cache, "IN_PLACE_FROM", 2 * 100)
    torch.manual_seed(2)
    ref, ours = DynamicLayer(), RoomyLayer()
    both(ref, ours, 90)                             # 2 rows x 91 positions: a cat
    both(ref, ours, 1)
    assert ours._key_buffer is None
    both(ref, ours, 9)                              # 2 x 100: into a buffer from here
    kept = ours.keys.data_ptr()
    both(ref, ours, 1)
    assert ours.keys.data_ptr() == kept and ours._key_buffer is not None
    idx = torch.tensor([1])
    ref.batch_select_indices(idx)                   # 1 row x 101: small again
    ours.batch_select_indices(idx)
    both(ref, ours, 1, rows=1)
    assert ours._key_buffer is None                 # the large buffer let go of


def test_only_full_attention_layers_switch():
    cache = DynamicCache(ddp_cache_data=[(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))])
    cache.layers.append(DynamicSlidingWindowLayer(sliding_window=8))
    keys = cache.layers[0].keys
    assert with_room(cache) is cache
    assert type(cache.layers[0]) is RoomyLayer and cache.layers[0].keys is keys
    assert type(cache.layers[1]) is DynamicSlidingWindowLayer
    moving = DynamicCache(ddp_cache_data=[(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))])
    moving.offloading = True                        # (made so only with an accelerator)
    with_room(moving)                               # offloading: layers move every step
    assert type(moving.layers[0]) is DynamicLayer


def pointers_per_step(model, monkeypatch):
    """After each forward of `model` on a cache: the storage of its first layer's keys."""
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        cache = kwargs.get("cache") or kwargs.get("past_key_values")
        if cache is not None and args == () and kwargs["input_ids"].shape[1] == 1:
            seen.append(cache.layers[0].keys.data_ptr())
        return out

    monkeypatch.setattr(model, "forward", spy)
    return seen


def kept(pointers) -> int:
    return sum(a == b for a, b in zip(pointers, pointers[1:]))


def test_batch_one_decoding_writes_each_step_in_place(tiny_kit, monkeypatch):
    lm = tiny_kit.model("causal_lm")
    seen = pointers_per_step(lm.model, monkeypatch)
    params = G.SamplingParams(max_new_tokens=40, chat=False)
    tokens = list(G.generate_tokens(lm.model, lm.tokenizer, "the cat sat on the", params))
    assert len(tokens) == 40 and len(seen) == 39
    assert kept(seen) >= len(seen) - 3          # a new buffer only when the room runs out
    assert [t.token_id for t in tokens] == hf_tokens(tiny_kit, "the cat sat on the", False,
                                                     max_new_tokens=40)


def test_the_schedulers_batch_writes_each_step_in_place(tiny_kit, monkeypatch):
    lm = tiny_kit.model("causal_lm")
    seen = pointers_per_step(lm.model, monkeypatch)
    sched = S.Scheduler(lm.model, lm.tokenizer, S.ServingConfig(max_batch=4,
                                                                 pause_for_short=True))
    jobs = [(p, dict(max_new_tokens=n, chat=False))
            for p, n in (("the cat sat on the", 40), ("hello", 30), ("a photo", 35))]
    try:
        runs = together(sched, jobs)
    finally:
        sched.close()
    assert [len(r.tokens) for r in runs] == [40, 30, 35] and sched.peak_batch >= 2
    # new buffers: when the room runs out, a stream joins or leaves, padding is trimmed
    assert len(seen) >= 39 and kept(seen) >= len(seen) - 8
    for (prompt, kw), run in zip(jobs, runs):
        assert [t.token_id for t in run.tokens] == hf_tokens(tiny_kit, prompt, **kw)


def test_greedy_in_place_equals_model_generate_offline(offline_kit):
    """Real weights, every append in place: token for token what transformers gives."""
    for chat, prompt in ((True, "Write one sentence about the sea."), (False, "The sea is")):
        ours, _ = ours_tokens(offline_kit, prompt, max_new_tokens=40, chat=chat)
        assert ours == hf_tokens(offline_kit, prompt, chat, max_new_tokens=40)
