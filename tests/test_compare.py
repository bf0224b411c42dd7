"""Compare mode's differences, checked by hand and on real task results of the tiny kit."""

import pytest

from mmcore import compare


def test_token_diff_aligns_instead_of_marking_everything_after_an_insertion():
    d = compare.tokens(["The", " cat", " sat", " down"], ["The", " big", " cat", " sat", " up"])
    assert d.a == [("The", "same"), (" cat", "same"), (" sat", "same"), (" down", "changed")]
    assert [m for _, m in d.b] == ["same", "changed", "same", "same", "changed"]
    assert d.first_difference == 1
    assert d.same_share == pytest.approx(3 / 5)


def test_token_diff_of_equal_and_prefix_outputs():
    same = compare.tokens(["a", "b"], ["a", "b"])
    assert same.first_difference is None and same.same_share == 1.0
    longer = compare.tokens(["a", "b"], ["a", "b", "c"])
    assert longer.first_difference == 2 and longer.b[-1] == ("c", "changed")
    assert compare.tokens([], []).same_share == 0.0


def test_rank_moves_for_zero_shot_and_fill_mask_lists():
    a = [("cat", 0.6), ("dog", 0.3), ("car", 0.1)]
    b = [("dog", 0.5), ("cat", 0.4), ("bus", 0.1)]
    rows = {r["item"]: r for r in compare.ranks(a, b)}
    assert [r["item"] for r in compare.ranks(a, b)] == ["dog", "cat", "bus", "car"]
    assert rows["dog"]["move"] == "up 1" and rows["cat"]["move"] == "down 1"
    assert rows["bus"]["move"] == "new in B" and rows["bus"]["rank_a"] is None
    assert rows["car"]["move"] == "only in A" and rows["car"]["score_a"] == 0.1
    fills = compare.ranks([{"token_str": "paris", "score": 0.9}],
                          [{"token_str": "paris", "score": 0.7}])
    assert fills == [{"item": "paris", "rank_a": 1, "score_a": 0.9, "rank_b": 1,
                      "score_b": 0.7, "move": "="}]


def test_retrieval_overlap_gained_and_lost():
    d = compare.retrieval([("x", .9), ("y", .8), ("z", .7)], [("y", .9), ("w", .8), ("x", .1)])
    assert d.overlap == pytest.approx(2 / 3)
    assert d.kept == [("x", 1, 3), ("y", 2, 1)]
    assert d.gained == ["w"] and d.lost == ["z"]
    assert compare.retrieval(["a", "b", "c"], ["c", "d", "e"], k=2).overlap == 0.0


def test_compare_two_sampling_settings_of_one_model(tiny_kit):
    """One model, two settings: greedy against greedy is all "same"; a different seed at
    temperature 1 parts somewhere, and the marks say where."""
    from mmcore.generation import SamplingParams, Generation

    def run(**kw):
        gen = Generation(SamplingParams(12, **kw).check())
        for _ in tiny_kit.generate_tokens("the cat", gen.params, run=gen):
            pass
        return [t.text for t in gen.tokens]

    greedy = run()
    assert compare.tokens(greedy, run()).first_difference is None
    sampled_a, sampled_b = run(temperature=1.0, seed=1), run(temperature=1.0, seed=2)
    d = compare.tokens(sampled_a, sampled_b)
    assert d.first_difference is not None
    i = d.first_difference
    assert sampled_a[:i] == sampled_b[:i]
    assert all(m == "same" for _, m in d.a[:i]) and d.same_share < 1
