"""Compiled decode steps (mmcore/compiled.py): a bucket compiles in the background while
requests decode eagerly, then requests decode through it, token for token as eager."""

import pytest
import torch

from mmcore import compiled as C
from mmcore import generation as G


def tokens(lm, prompt, params, compiled=None, forced=None):
    run = G.Generation(params)
    list(G.generate_tokens(lm.model, lm.tokenizer, prompt, params, forced=forced, run=run,
                           compiled=compiled))
    return run


def ready(lm, total=100):
    """A CompiledDecode with `total`'s bucket compiled; meanwhile eager decoding of the same
    model in this thread gives its usual tokens."""
    params = G.SamplingParams(max_new_tokens=12, chat=False)
    before = [t.token_id for t in tokens(lm, "A quiet morning", params).tokens]
    decode = C.CompiledDecode(lm.model)
    assert decode.session(total, wait=False) is None   # not compiled yet; its compile starts
    assert decode.state[C.bucket(total)] in ("compiling", "ready")
    during = [t.token_id for t in tokens(lm, "A quiet morning", params).tokens]
    assert decode.wait(C.bucket(total)) == "ready", decode.state
    assert during == before
    return decode


def counting(decode):
    calls = []
    inner = decode._fn

    def fn(*args):
        calls.append(1)
        return inner(*args)

    decode._fn = fn
    return calls


def test_compiled_steps_give_eager_tokens_greedy_sampled_and_forced(tiny_kit):
    lm = tiny_kit.model("causal_lm")
    decode = ready(lm)
    calls = counting(decode)
    cases = [
        ("Once upon a time", G.SamplingParams(max_new_tokens=40, chat=False), None),
        ("the cat", G.SamplingParams(max_new_tokens=30, temperature=0.9, top_k=20, top_p=0.9,
                                     repetition_penalty=1.2, seed=7, chat=False), None),
        ("hello there", G.SamplingParams(max_new_tokens=20, chat=False), [5, 9, 11]),
    ]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for prompt, params, forced in cases:
        eager = tokens(lm, prompt, params, forced=forced)
        before = len(calls)
        fast = tokens(lm, prompt, params, decode, forced=forced)
        assert len(calls) - before == len(fast.tokens) - 1 - len(forced or [])   # all compiled
        assert [t.token_id for t in fast.tokens] == [t.token_id for t in eager.tokens]
        assert fast.text == eager.text and fast.finish == eager.finish
        for a, b in zip(fast.tokens, eager.tokens):
            assert abs(a.prob - b.prob) < 1e-5
            assert [x[2] for x in a.alternatives] == [x[2] for x in b.alternatives]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs    # no recompile


def test_buckets_compile_once_each_and_long_runs_stay_eager(tiny_kit):
    lm = tiny_kit.model("causal_lm")
    decode = ready(lm, 100)
    assert decode.session(200) is not None             # 200 positions: still the 256 bucket
    assert C.bucket(10**6) is None and decode.session(10**6) is None
    assert set(decode.state) == {256}                  # nothing started for the long one
    assert "256 ready" in decode.describe()
    decode.session(300, start=False)
    assert set(decode.state) == {256}


def test_each_model_keeps_its_own_graphs_and_few_guards(tiny_kit):
    """The compiled step's guards leave out the model's modules and tensors (checking them
    each step cost ~1 ms a token on SmolLM2): two models of one class in different forms
    (fp32, int8 weights) still each compile and run their own graph, with their own eager
    tokens."""
    import copy
    from types import SimpleNamespace

    from mmcore import quantized_lm

    lm = tiny_kit.model("causal_lm")
    other = copy.deepcopy(lm.model)
    quantized_lm.int8_weights(other)
    kept = []
    for model in (lm.model, other):
        decode = C.CompiledDecode(model)
        inner = decode._guards
        decode._guards = lambda entries, inner=inner: kept.append(
            [e.name for e, keep in zip(entries, inner(entries)) if keep]) or inner(entries)
        assert decode.session(60) is not None, decode.state
        params = G.SamplingParams(max_new_tokens=24, chat=False)
        twin = SimpleNamespace(model=model, tokenizer=lm.tokenizer)
        eager = tokens(twin, "Once upon a time", params)
        compiled = tokens(twin, "Once upon a time", params, decode)
        assert [t.token_id for t in compiled.tokens] == [t.token_id for t in eager.tokens]
        for a, b in zip(compiled.tokens, eager.tokens):
            assert abs(a.prob - b.prob) < 1e-4
    assert len(kept) == 2                          # a graph each, guarded without modules
    assert not [name for names in kept for name in names if name.startswith("self.model.")]


def test_a_step_that_breaks_its_graph_stays_eager(tiny_kit):
    """After a graph break dynamo compiles the frames below it, whose code every model of
    the class shares, with their module guards left out: two models could share a graph.
    A break fails the compile instead, and decoding stays eager."""
    import copy

    model = copy.deepcopy(tiny_kit.model("causal_lm").model)
    inner = model.forward

    def breaking(*args, **kwargs):
        torch._dynamo.graph_break()
        return inner(*args, **kwargs)

    model.forward = breaking
    decode = C.CompiledDecode(model)
    assert decode.session(50) is None
    assert decode.state[256].startswith("failed"), decode.state


def test_a_failed_compile_leaves_eager_decoding(tiny_kit, monkeypatch):
    lm = tiny_kit.model("causal_lm")

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    decode = C.CompiledDecode(lm.model)
    assert decode.session(50) is None                  # tried, waited for, failed
    assert decode.state[256].startswith("failed: RuntimeError")
    assert decode.session(50) is None                  # not retried, eager from now on
    params = G.SamplingParams(max_new_tokens=10, chat=False)
    assert [t.token_id for t in tokens(lm, "hi", params, decode).tokens] == \
        [t.token_id for t in tokens(lm, "hi", params).tokens]


def test_switch(tiny_kit, monkeypatch):
    """Off unless MMCORE_COMPILE=1 (a compile stops the process's other threads)."""
    for flag in ("", "0", "no"):
        monkeypatch.setenv("MMCORE_COMPILE", flag)
        assert not C.enabled() and tiny_kit.model("causal_lm").compiled() is None
    monkeypatch.setenv("MMCORE_COMPILE", "1")
    has_cxx = bool(C.shutil.which("g++") or C.shutil.which("c++") or C.shutil.which("clang++"))
    assert C.enabled() == has_cxx


def test_exact_stays_token_identical_when_compiled_on_the_offline_lm(offline_kit):
    """`exact` promises transformers' tokens: compiled, the real SmolLM2 gives the eager
    tokens for 48 greedy tokens on two prompts."""
    lm = offline_kit.model("causal_lm")
    decode = ready(lm)
    for prompt in ("The history of the printing press begins in",
                   "Here is a short guide to growing tomatoes at home:"):
        params = G.SamplingParams(max_new_tokens=48, chat=False)
        assert [t.token_id for t in tokens(lm, prompt, params, decode).tokens] == \
            [t.token_id for t in tokens(lm, prompt, params).tokens]


needs_cxx = pytest.mark.skipif(not C._has_compiler(),
                               reason="inductor's CPU code needs a C++ compiler")


def _quantized(kind):
    from mmcore import precision as P

    weight = torch.randn(1024, 576) * 0.05
    if kind == "int8 weights":
        linear = torch.nn.Linear(576, 1024, bias=True)
        linear.weight.data, linear.bias.data = weight, torch.randn(1024) * 0.1
        return P.Int8Linear.from_linear(linear), weight, linear.bias.data
    if kind == "4-bit weights":
        q = torch.randint(0, 16, (1024, 576))
        d, m = torch.rand(1024, 18) * 0.01, -torch.rand(1024, 18) * 0.05
        module = P.Int4Linear.from_q4_1(q, d, m, dtype=torch.bfloat16)
        return module, module.weight.float(), None
    passes = 1 if kind == "int8 x int8, one pass" else 2
    return P.DynamicInt8Linear.from_weight(weight, passes=passes), weight, None


@needs_cxx
@pytest.mark.parametrize("kind", ["int8 x int8, one pass", "int8 x int8, two passes",
                                  "int8 weights", "4-bit weights"])
@pytest.mark.parametrize("rows", [1, 3])
def test_quantized_linears_compile_to_their_eager_results(kind, rows):
    """Every quantised linear of `fast` is in the compiled decode step at one row (a fast
    LM's vocabulary head: two passes). Inductor once gave nonsense for the two-pass one-row
    form (two 1-row products on slices of one int8 buffer: errors of 1e9), so every greedy
    token after the first was garbage."""
    torch.manual_seed(0)
    linear, weight, bias = _quantized(kind)
    x = torch.randn(1, rows, 576)
    torch._dynamo.reset()
    with torch.inference_mode():
        eager = linear.eval()(x)
        compiled = torch.compile(linear, dynamic=False)(x)
        exact = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(compiled, eager, rtol=0.01, atol=0.01)   # bf16 where fused
    assert ((compiled - exact).norm() / exact.norm()) < 0.02


@needs_cxx
def test_shared_input_parts_compile_to_one_product():
    """q/k/v as parts of one 4-bit product trace into one graph with one product (the
    per-thread bookkeeping of `SharedInputPart` is Python dynamo runs at trace time)."""
    from mmcore import precision as P

    torch.manual_seed(0)
    blocks = [(torch.randint(0, 16, (rows, 128)), torch.rand(rows, 4) * 0.01,
               -torch.rand(rows, 4) * 0.05) for rows in (64, 32, 32)]
    layers = [P.Int4Linear.from_q4_1(*b, torch.bfloat16) for b in blocks]
    stacked = P.Int4Linear.from_q4_1(*(torch.cat(x) for x in zip(*blocks)), torch.bfloat16)

    class Attention(torch.nn.Module):
        def forward(self, h):
            return self.q_proj(h)[..., :32] * self.k_proj(h) + self.v_proj(h)

    model = Attention()
    P.install_fused(model, ("q_proj", "k_proj", "v_proj"), stacked, [64, 32, 32])
    x = torch.randn(1, 1, 128)
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(x)
        compiled = torch.compile(model, dynamic=False, fullgraph=True)(x)
        want = layers[0](x)[..., :32] * layers[1](x) + layers[2](x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    products = [n for n in explained.graphs[0].graph.nodes
                if "int4pack_mm" in str(n.target)]
    assert len(products) == 1
    torch.testing.assert_close(compiled, want, rtol=0.01, atol=0.01)


@needs_cxx
def test_fast_gives_its_eager_tokens_when_compiled_on_the_offline_lm():
    """`fast` compiled decodes what `fast` eager decodes, up to a near-tie: the offline
    LM's 4-bit body and two-pass int8 head, 48 greedy tokens on two prompts (it once gave
    " Johannes proble strugg strugg snipp ..." after a right first token)."""
    import mmcore

    lm = mmcore.load_kit("offline", precision="fast").model("causal_lm")
    decode = ready(lm)
    for prompt in ("The history of the printing press begins in",
                   "Here is a short guide to growing tomatoes at home:"):
        params = G.SamplingParams(max_new_tokens=48, chat=False)
        eager = tokens(lm, prompt, params)
        compiled = tokens(lm, prompt, params, decode)
        assert len(compiled.tokens) == len(eager.tokens) == 48
        for i, (a, b) in enumerate(zip(compiled.tokens, eager.tokens)):
            # bf16 activations are rounded where inductor fuses, not where eager does:
            # probabilities move by up to ~0.03, so only a near-tie may go the other way
            assert abs(a.prob - b.prob) < 0.03, (prompt, i)
            if a.token_id != b.token_id:
                top = [p for _, p, _ in b.alternatives[:2]]
                assert top[0] - top[1] < 0.06, (prompt, i, a, b)
                break                                   # the texts go on differently


def test_the_scheduler_decodes_a_lone_stream_on_the_compiled_step(tiny_kit):
    """Served, a stream alone uses the compiled step; a second stream joining turns its
    static cache into the batch's, and every stream still gets its lone eager tokens."""
    import threading
    import time

    from mmcore import serving as S
    from mmcore.lanes import PRIORITY

    lm = tiny_kit.model("causal_lm")
    decode = ready(lm, 200)
    calls = counting(decode)
    sched = S.Scheduler(lm.model, lm.tokenizer,
                        S.ServingConfig(pause_for_short=True, max_pause=600), compiled=decode)

    def wait_until(condition):
        end = time.monotonic() + 120
        while not condition():
            assert time.monotonic() < end, "the scheduler never got there"
            time.sleep(0.002)

    try:
        a = G.SamplingParams(max_new_tokens=120, chat=False)
        b = G.SamplingParams(max_new_tokens=30, temperature=0.8, seed=3, chat=False)
        lone = G.Generation(a)
        list(sched.generate_tokens("Once upon a time", a, run=lone))
        assert len(calls) == len(lone.tokens) - 1        # every decode step compiled
        assert [t.token_id for t in lone.tokens] == \
            [t.token_id for t in tokens(lm, "Once upon a time", a).tokens]

        runs = {"a": G.Generation(a), "b": G.Generation(b)}
        first = threading.Thread(target=lambda: list(sched.generate_tokens(
            "Once upon a time", a, run=runs["a"])))
        first.start()
        wait_until(lambda: sched._single is not None and sched.steps > 130)
        with PRIORITY.short():                           # holds it between two steps
            wait_until(lambda: PRIORITY.waiting == 1)
            second = threading.Thread(target=lambda: list(sched.generate_tokens(
                "the cat", b, run=runs["b"])))
            second.start()
            wait_until(lambda: sched._waiting)
        first.join()
        second.join()
        assert sched.peak_batch == 2
        for key, prompt, params in (("a", "Once upon a time", a), ("b", "the cat", b)):
            assert [t.token_id for t in runs[key].tokens] == \
                [t.token_id for t in tokens(lm, prompt, params).tokens]
    finally:
        sched.close()
