"""Attention maps of the kits' own models: real weights, restored attention settings."""

import pytest
import torch

import mmcore
from mmcore import attention


@pytest.mark.parametrize("kit_name", ["tiny", "offline"])
def test_every_model_choice_gives_row_stochastic_maps(kit_name):
    kit = mmcore.load_kit(kit_name)
    for label, key in attention.choices(kit).items():
        maps = attention.attention_maps(kit, key, "The cat sat on the mat.")
        layers, heads, t, t2 = maps.weights.shape
        assert t == t2 == len(maps.tokens) and layers >= 2 and heads >= 2
        torch.testing.assert_close(maps.weights.sum(-1), torch.ones(layers, heads, t))
        owner = attention._resolve(kit, key)[0]
        assert owner.config._attn_implementation != "eager"    # put back after the call


def test_causal_models_never_attend_to_the_future(tiny_kit):
    maps = attention.attention_maps(tiny_kit, "causal_lm", "the cat sat on the mat")
    assert float(maps.weights.triu(1).abs().max()) == 0.0


def test_offline_choices_do_not_list_the_same_model_twice(offline_kit):
    keys = list(attention.choices(offline_kit).values())
    assert keys == ["causal_lm", "text_tower"]


def test_long_text_is_cut_with_a_notice(tiny_kit):
    maps = attention.attention_maps(tiny_kit, "masked_lm", "word " * 300)
    assert len(maps.tokens) == attention.MAX_TOKENS and maps.notices


def test_worked_example_shapes():
    ex = attention.worked_example(["the", "cat", "sat"])
    assert ex["q"] == (1, 2, 3, 4) and ex["out"] == (1, 3, 8)
    torch.testing.assert_close(ex["weights"].sum(-1), torch.ones(3))


@pytest.mark.parametrize("key", ["masked_lm", "causal_lm", "text_tower"])
def test_the_shared_model_is_never_switched_to_eager(tiny_kit, key):
    """What a concurrent request would see: the shared model's attention implementation while
    the view runs stays its own. The weights equal an independent eager copy's."""
    import copy

    owner, part, tok = attention._resolve(tiny_kit, key)
    assert owner.config._attn_implementation != "eager"
    seen = []
    first = next(m for m in owner.modules() if m is not owner)
    handle = first.register_forward_hook(
        lambda *_: seen.append(owner.config._attn_implementation))
    try:
        maps = attention.attention_maps(tiny_kit, key, "the cat sat on the mat")
    finally:
        handle.remove()
    assert "eager" not in seen
    reference = copy.deepcopy(owner)
    reference.set_attn_implementation("eager")
    module = getattr(reference, part) if part else reference
    enc = tok("the cat sat on the mat", return_tensors="pt")
    with torch.no_grad():
        out = module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     output_attentions=True)
    torch.testing.assert_close(maps.weights, torch.stack([a[0] for a in out.attentions]))
    assert attention.eager_twin(owner).config is not owner.config
    assert all(a is b for a, b in zip(attention.eager_twin(owner).parameters(),
                                      owner.parameters()))      # weights shared, not copied
