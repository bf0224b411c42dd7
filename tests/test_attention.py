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
