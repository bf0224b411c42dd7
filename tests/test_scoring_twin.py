"""Text scoring (fill-mask and NSP on a causal LM): candidates after shared prefixes scored
in one forward (one sequence per prefix, a tree mask), and at `fast` on an int8 x int8 twin
of the model that shares its embeddings and norms."""

import math
from unittest import mock

import pytest
import torch

from mmcore import lm_scoring as L
from mmcore import precision

needs_int8 = pytest.mark.skipif(not precision.dynamic_int8_pays(),
                                reason="no int8 dot products (VNNI/AMX) on this CPU")


def test_dynamic_int8_linear_is_close_and_each_row_its_own():
    torch.manual_seed(0)
    linear = torch.nn.Linear(37, 29)
    layer = precision.DynamicInt8Linear.from_weight(linear.weight, linear.bias)
    x = torch.randn(2, 7, 37)
    x[0, 3] *= 50                                           # one loud row among quiet ones
    with torch.no_grad():
        want = linear(x)
    got = layer(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 0.02
    flat = x.reshape(-1, 37)
    alone = torch.cat([layer(flat[i:i + 1]) for i in range(len(flat))])
    assert torch.equal(alone, got.reshape(-1, 29))          # rows quantised on their own
    assert torch.equal(layer(torch.zeros(1, 37)), linear.bias[None].detach())


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_linears_reading_one_input_run_as_one_product_bit_for_bit(passes, family, tiny_kit):
    """q/k/v (and a gated MLP's gate/up) fused into one int8 product give exactly what
    their separate products give: each row is quantised once either way and the integer
    sums are exact."""
    import copy

    if family == "llama":
        model = tiny_llama()
        ids = torch.randint(0, 97, (3, 11))
        groups = 2 * 2                                   # per layer: q/k/v and gate/up
    else:
        from mmcore import hub

        # as transformers loads it (the kit's exact model may run its linears on oneDNN)
        model = hub.load_role("masked_lm", tiny_kit.spec("masked_lm").source, "cpu")[0]
        ids = torch.randint(5, model.config.vocab_size, (3, 11))
        groups = model.config.num_hidden_layers          # query/key/value
    precision.replace_linears(model, lambda name, lin: precision.DynamicInt8Linear.from_weight(
        lin.weight, lin.bias, passes))
    separate = copy.deepcopy(model)
    assert precision.fuse_shared_inputs(model) == groups
    parts = [m for m in model.modules() if isinstance(m, precision.SharedInputPart)]
    assert len(parts) == (groups // 2 * 5 if family == "llama" else groups * 3)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0                                      # a padded row
    with torch.inference_mode():
        want = separate(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    # a part fed an input its siblings did not see still answers for that input
    part, alone = parts[1], dict(separate.named_modules())
    name = next(n for n, m in model.named_modules() if m is part)
    x = torch.randn(2, 5, part.in_features)
    assert torch.equal(part(x), alone[name](x))
    assert torch.equal(part.weight, alone[name].weight)
    # whatever replaces the fused module on the parent is what every part runs (a prefill
    # twin's copy turns it to two passes; a converter may swap it for a new module)
    owner = part._owner
    fused_name = part.fused_name
    old = getattr(owner, fused_name)
    setattr(owner, fused_name, precision.DynamicInt8Linear(old.qweight_t.T, old.scales, old.bias,
                                                           3 - old.passes))
    assert torch.equal(part(x), getattr(owner, fused_name)(x)[..., part.start:part.end])


def test_fused_products_are_per_thread(tiny_kit):
    """Two threads running forwards of one fused model at once each get their own answers."""
    import threading

    model = tiny_llama()
    precision.replace_linears(model, lambda name, lin: precision.DynamicInt8Linear.from_weight(
        lin.weight, lin.bias))
    precision.fuse_shared_inputs(model)
    inputs = [torch.randint(0, 97, (2, 9)) for _ in range(2)]
    with torch.inference_mode():
        want = [model(input_ids=ids).logits for ids in inputs]
    got, errors = [[] for _ in inputs], []

    def run(i):
        try:
            with torch.inference_mode():
                for _ in range(30):
                    got[i].append(model(input_ids=inputs[i]).logits)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(g, want[i]) for i in range(2) for g in got[i])


def plain_scores(model, tok, prefix_text, continuation):
    """log P(continuation | start + prefix) and the next token's log-probabilities, from one
    forward over the whole text (no cache, no batch)."""
    ids = [L.start_id(tok)] + L.encode(tok, prefix_text)
    full = torch.tensor([ids + continuation])
    with torch.inference_mode():
        logp = model(input_ids=full).logits[0].float().log_softmax(-1)
    picks = logp[torch.arange(len(ids) - 1, full.shape[1] - 1), full[0, len(ids):]]
    return float(picks.sum()), logp[-1]


def fast_offline():
    import mmcore

    return mmcore.load_kit("offline", precision="fast")


@pytest.fixture(params=["tiny-sdpa", "tiny-eager", "offline"])
def lm(request, tiny_kit, offline_kit):
    if request.param == "offline":                            # Llama with grouped KV heads
        role = offline_kit.model("causal_lm")                 # fp32 (conftest)
        yield role.model, role.tokenizer
        return
    role = tiny_kit.model("causal_lm")                        # GPT-2
    before = role.model.config._attn_implementation
    role.model.set_attn_implementation(request.param.split("-")[1])
    yield role.model, role.tokenizer
    role.model.set_attn_implementation(before)


@pytest.mark.parametrize("tree_tokens", [512, 5, 3])
def test_scores_after_shared_prefixes_equal_plain_forwards(lm, tree_tokens, monkeypatch):
    """Every candidate after every prefix, in one forward of a sequence per prefix (or
    several per prefix, when they hold at most `tree_tokens` tokens, and then several
    forwards), against a plain forward over each whole text."""
    monkeypatch.setattr(L, "TREE_TOKENS", tree_tokens)
    model, tok = lm
    texts = ["The cat sat on the mat and", "Once"]
    prefixes = [L.run_prefix(model, tok, t) for t in texts]
    conts = [L.encode(tok, t) for t in (" then it slept", " upon a time there", " it",
                                        " was warm and dry")]
    items = [(p, c) for p in prefixes for c in conts]
    got = L.score_rows(model, items)
    for (p, c), (total, nxt) in zip(items, got):
        want_total, want_next = plain_scores(model, tok, texts[prefixes.index(p)], c)
        assert math.isclose(total, want_total, rel_tol=1e-4, abs_tol=1e-3), (total, want_total)
        torch.testing.assert_close(nxt, want_next, atol=1e-3, rtol=1e-4)


@needs_int8
def test_fast_offline_scores_on_an_int8_twin_sharing_embeddings(offline_kit):
    fast = fast_offline()
    role = fast.model("causal_lm")
    twin, model = role.scoring_model, role.model
    assert twin is not model and "text scoring int8 x int8" in role.precision
    assert twin.get_input_embeddings().weight is model.get_input_embeddings().weight
    assert twin.model.norm.weight is model.model.norm.weight
    # per layer q/k/v and gate/up are one product each: 4 int8 matmuls, not 7 (+ the head)
    assert sum(isinstance(m, precision.DynamicInt8Linear) for m in twin.modules()) == 121
    assert sum(isinstance(m, precision.SharedInputPart) for m in twin.modules()) == 150
    if "4-bit" in role.precision:
        assert sum(isinstance(m, precision.Int4Linear) for m in model.modules()) == 4 * 30
        # the int8 head's weights are lent, not copied
        assert twin.lm_head.qweight_t.data_ptr() == model.lm_head.qweight_t.data_ptr()
    # its int8 weights (cached, built from the GGUF blocks) are the fp32 weights' own
    exact = dict(offline_kit.model("causal_lm").model.named_modules())    # fp32 (conftest)
    mine = dict(twin.named_modules())
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.29.mlp.down_proj", "lm_head"):
        q, scales = precision.quantize_int8(exact[name].weight.detach())
        assert torch.equal(mine[name].qweight_t, q.T) and torch.equal(mine[name].scales, scales)
    # fill-mask reads the twin; its answer matches the 4-bit model's on a plain probe
    from mmcore.fill_mask import CausalFill

    assert CausalFill(role).model is twin
    assert fast.fill_mask("The capital of France is [MASK].", top_k=1)[0][0][
        "token_str"] == "Paris"


@needs_int8
def test_fast_bert_roles_run_int8_linears_close_to_fp32(tiny_kit, monkeypatch):
    """Fill-mask and NSP heads at `fast` on a CPU without fast bf16: every linear int8 x
    int8, logits close to the fp32 model's."""
    import mmcore
    from mmcore import kits

    monkeypatch.setenv("MMCORE_ENCODER_BF16", "0")
    text = "The cat sat on the [MASK] and slept."
    for key in ("masked_lm", "next_sentence"):
        exact = tiny_kit.model(key)
        fast = kits._load(tiny_kit.spec(key), key, torch.device("cpu"), "fast")
        assert "int8 x int8" in fast.precision
        assert not [m for m in fast.model.modules() if isinstance(m, torch.nn.Linear)]
        if key == "masked_lm":
            ids = exact.tokenizer(text)["input_ids"]
            at = [ids.index(exact.tokenizer.mask_token_id)]
            want, got = exact.forward([ids], [at]), fast.forward([ids], [at])
        else:
            enc = exact.tokenizer(["The cat sat."], ["It slept."], return_tensors="pt")
            want, got = exact.forward(enc), fast.forward(enc)
        assert float((got - want).norm() / want.norm()) < 0.05
        assert float(torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1]) > 0.99
    assert mmcore.load_kit("tiny", precision="fast").fill_mask(text, top_k=3)


@needs_int8
def test_fast_offline_does_not_share_scoring_forwards_across_requests():
    """The twin's per-row rounding turns another batch shape's float noise into visibly
    different scores, so a request's answer must not depend on who else asks: no sharing."""
    assert fast_offline().model("causal_lm").scorer() is None


def test_scoring_refuses_an_attention_that_ignores_masks(tiny_kit, monkeypatch):
    from mmcore.errors import InputError

    role = tiny_kit.model("causal_lm")
    prefix = L.run_prefix(role.model, role.tokenizer, "Once")
    monkeypatch.setattr(role.model.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(InputError, match="sdpa or eager"):
        L.score_rows(role.model, [(prefix, L.encode(role.tokenizer, " upon"))])


@needs_int8
def test_two_pass_int8_is_as_accurate_as_int8_weights_on_real_weights():
    """MiniLM (a real BERT encoder, the offline text tower): the BERT roles' two-pass form
    errs no more than int8 weights with exact activations; one pass errs more."""
    import copy

    import transformers as tf

    from mmcore import offline, tiny

    folder = offline.minilm_folder()
    model = tf.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    tok = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    sentences = [s.strip() for s in tiny.SENTENCES.splitlines() if s.strip()][:12]
    enc = tok(sentences, padding=True, return_tensors="pt")
    real = enc["attention_mask"].bool()

    def hidden(m):
        with torch.inference_mode():
            return m(**enc).last_hidden_state[real]

    def converted(make):
        m = copy.deepcopy(model)
        precision.replace_linears(m, lambda name, lin: make(lin))
        return m

    class WeightOnly(precision.DynamicInt8Linear):          # int8 weights, exact activations
        def forward(self, x):
            return torch.nn.functional.linear(x, self.qweight_t.T.float() * self.scales[:, None],
                                              self.bias)

    want = hidden(model)
    err = {name: float((hidden(converted(make)) - want).norm() / want.norm()) for name, make in {
        "one pass": lambda lin: precision.DynamicInt8Linear.from_weight(lin.weight, lin.bias),
        "two passes": lambda lin: precision.DynamicInt8Linear.from_weight(lin.weight, lin.bias,
                                                                          passes=2),
        "weight-only": lambda lin: WeightOnly.from_weight(lin.weight, lin.bias)}.items()}
    print(f"MiniLM hidden-state error: {err}")
    assert err["two passes"] <= 1.05 * err["weight-only"] < err["one pass"]


def test_causal_fill_refuses_targets_it_would_spend_minutes_on(offline_kit):
    """Checked before any forward: a 50-token "word", and 100 targets at 4 masks (487 s
    measured before this check), get a clear message at once."""
    import time

    from mmcore.errors import InputError

    start = time.perf_counter()
    with pytest.raises(InputError, match="at most 16"):
        offline_kit.fill_mask("The capital of France is [MASK].", targets=["word" * 50])
    many = [f"word{i}" for i in range(100)]
    with pytest.raises(InputError, match="Use fewer targets or masks"):
        offline_kit.fill_mask("[MASK] [MASK] [MASK] [MASK]", targets=many)
    assert time.perf_counter() - start < 5
    got = offline_kit.fill_mask("The capital of France is [MASK].", targets=many[:3] + ["Paris"])
    assert got[0][0]["token_str"] == "Paris"


def test_causal_fill_refuses_a_beam_it_would_spend_minutes_on(offline_kit):
    """Checked before any forward: 5 masks at top-k 20 (43 s on 2 cores, holding the short
    lane's one slot against every other user), 5 masks in a long text (over 13 minutes) and
    one mask in a 2,000-token text (~20 s; attention grows with its square) get a clear
    message at once; 2 masks at top-k 5 still run."""
    import time

    from mmcore import lm_scoring
    from mmcore.errors import InputError

    offline_kit.fill_mask("The capital of France is [MASK].")       # loaded before the clock
    forwards = []
    real = lm_scoring.run_many
    five = "The [MASK] [MASK] at the [MASK] [MASK] near [MASK]."
    start = time.perf_counter()
    with mock.patch.object(lm_scoring, "run_many",
                           lambda *a, **k: forwards.append(1) or real(*a, **k)):
        with pytest.raises(InputError, match="Use fewer masks, a smaller top-k or a shorter"):
            offline_kit.fill_mask(five, top_k=20)
        with pytest.raises(InputError, match="5 masks at top-k 5 in a [0-9]+-token text"):
            offline_kit.fill_mask("It rained all day. " * 120 + five, top_k=5)
        with pytest.raises(InputError, match="1 mask at top-k 5 in a [0-9]+-token text"):
            offline_kit.fill_mask("It rained all day. " * 400 + "The [MASK] sat.", top_k=5)
    assert not forwards and time.perf_counter() - start < 5
    got = offline_kit.fill_mask("The [MASK] sat on the [MASK].", top_k=5)
    assert len(got) == 2 and all(len(mask) == 5 for mask in got)


@needs_int8
def test_fast_lm_heads_multiply_int8_by_int8_in_two_passes(tiny_kit, offline_kit):
    """Where the CPU has int8 dot products, a fast causal LM's vocabulary head (a 49152-row
    product every decode step) is a two-pass `DynamicInt8Linear`: as accurate as its int8
    weights with exact activations, each row's logits the same alone as in a batch of 8
    (the scheduler's batched greedy equals batch 1: tests/test_serving.py at `fast`), and
    the scoring twin's head lends the same int8 weights."""
    from mmcore import kits

    exact_heads, models = {}, {}
    gpt2 = kits._load(tiny_kit.spec("causal_lm"), "causal_lm", torch.device("cpu"), "fast")
    if "int8 weights" in gpt2.precision:                      # where bf16 matmuls exist too
        models["gpt-2"] = gpt2.model
        exact_heads["gpt-2"] = tiny_kit.model("causal_lm").model.get_output_embeddings()
    offline = fast_offline().model("causal_lm")
    if "4-bit" in offline.precision:
        models["smollm2"] = offline.model
        exact_heads["smollm2"] = offline_kit.model("causal_lm").model.get_output_embeddings()
    assert models, "no fast causal LM on a CPU with int8 dot products"
    torch.manual_seed(0)
    for name, model in models.items():
        head = model.get_output_embeddings()
        assert isinstance(head, precision.DynamicInt8Linear) and head.passes == 2, name
        rows = torch.randn(8, head.in_features)
        rows[3] *= 40                                        # one loud row among quiet ones
        with torch.no_grad():
            weight_only = torch.nn.functional.linear(rows, head.weight, head.bias)
            fp32 = exact_heads[name](rows)                   # the exact kit's own head
        got = head(rows)
        assert float((got - weight_only).norm() / weight_only.norm()) < 2e-3, name
        assert float((got - fp32).norm() / fp32.norm()) < 0.02, name
        alone = torch.cat([head(rows[i:i + 1]) for i in range(len(rows))])
        assert torch.equal(alone, got), f"{name}: a row alone differs from it in a batch"
    if "smollm2" in models and offline.scoring_model is not offline.model:
        twin_head = offline.scoring_model.lm_head
        assert twin_head.passes == 1
        assert twin_head.qweight_t.data_ptr() == offline.model.lm_head.qweight_t.data_ptr()


@needs_int8
def test_fast_offline_prompts_prefill_on_a_two_pass_twin(offline_kit):
    """A prompt's forward (many tokens at once: where the 4-bit kernel's cost grows with
    every row) runs on a two-pass twin sharing the scoring twin's int8 weights, and
    generation and the scheduler read it. It is as accurate as int8 weights rounded from
    the Q4_1 ones: perplexity within 2% of exact (20.50 against 20.70; the 4-bit model
    20.71), logits within 5% of exact's (median 3.8%; the 4-bit model 1.8%)."""
    from mmcore import compiled, lm_scoring, quantized_lm, tiny

    role = fast_offline().model("causal_lm")
    if "4-bit" not in role.precision:
        pytest.skip("no 4-bit kernel here")
    model, tok = role.model, role.tokenizer
    runner = quantized_lm.prefill_model(model)
    assert runner is not model and runner is not role.scoring_model
    layers = [m for m in runner.modules() if isinstance(m, precision.DynamicInt8Linear)]
    assert len(layers) == 121 and all(m.passes == 2 for m in layers)
    assert all(m.passes == 1 for m in role.scoring_model.modules()
               if isinstance(m, precision.DynamicInt8Linear))      # the scoring twin's own
    twin = dict(role.scoring_model.named_modules())
    assert all(m.qweight_t.data_ptr() == twin[n].qweight_t.data_ptr()
               for n, m in runner.named_modules() if isinstance(m, precision.DynamicInt8Linear))
    assert runner.get_input_embeddings().weight is model.get_input_embeddings().weight

    text = " ".join(line.strip() for line in tiny.SENTENCES.splitlines() if line.strip())
    ids = torch.tensor([[lm_scoring.start_id(tok)] + lm_scoring.encode(tok, text)])

    def perplexity(m):
        with torch.inference_mode():
            logp = m(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        return math.exp(-float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].mean()))

    p_exact, p_runner = perplexity(offline_kit.model("causal_lm").model), perplexity(runner)
    assert abs(p_runner / p_exact - 1) < 0.02, (p_runner, p_exact)
    with torch.inference_mode():
        logits, _, _ = compiled.prefill(model, None, ids[:, :40], 64, 1)   # generation's
        mine = runner(input_ids=ids[:, :40]).logits[0, -1:]
        want = offline_kit.model("causal_lm").model(input_ids=ids[:, :40]).logits[0, -1:]
    assert torch.equal(logits, mine)                        # the prompt ran on the twin
    got = logits.float()
    assert float((got - want).norm() / want.norm()) < 0.05
    assert int(got.argmax()) == int(want.argmax())


@needs_int8
def test_fast_int8_lm_prompts_prefill_on_a_two_pass_twin(tiny_kit):
    """A causal LM in per-channel int8 weights (the hub kit's form at `fast`) runs each
    prompt's forward on a two-pass twin of the same int8 weights: GPT-2 base shape, 2
    threads, 400 tokens 641 -> 289 ms (fp32 334), 16 tokens 40 -> 27, error against fp32
    no larger than the weight-only kernel's."""
    from mmcore import compiled, kits, quantized_lm

    role = kits._load(tiny_kit.spec("causal_lm"), "causal_lm", torch.device("cpu"), "fast")
    if "int8 weights" not in role.precision:
        pytest.skip("no fast int8 form here (needs bf16 matmuls too)")
    assert "prompts int8 x int8" in role.precision
    model = role.model
    runner = quantized_lm.prefill_model(model)
    assert runner is not model
    int8 = {n: m for n, m in model.named_modules() if isinstance(m, precision.Int8Linear)}
    mine = {n: m for n, m in runner.named_modules() if isinstance(m, precision.DynamicInt8Linear)}
    assert int8 and set(int8) <= set(mine) and all(m.passes == 2 for m in mine.values())
    assert all(mine[n].qweight_t.data_ptr() == m.qweight.data_ptr() for n, m in int8.items())
    ids = torch.tensor([role.tokenizer("the cat sat on the mat and then it slept " * 4)[
        "input_ids"]])
    with torch.inference_mode():
        logits, _, _ = compiled.prefill(model, None, ids, ids.shape[1] + 8, ids.shape[1])
        theirs = runner(input_ids=ids).logits[0]
        weight_only = model(input_ids=ids).logits[0].float()
        want = tiny_kit.model("causal_lm").model(input_ids=ids).logits[0]
    assert torch.equal(logits, theirs)                      # the prompt ran on the twin
    err = float((logits.float() - want).norm() / want.norm())
    assert err <= 1.05 * float((weight_only - want).norm() / want.norm()), err


def test_two_pass_products_follow_their_input_not_the_default_dtype():
    """The second pass's buffer is made like its input: a process whose default dtype is
    float64 gets the same fp32 product."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(37, 29)
    layer = precision.DynamicInt8Linear.from_weight(linear.weight, linear.bias, passes=2)
    x = torch.randn(3, 37)
    want = layer(x)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = layer(x)
    finally:
        torch.set_default_dtype(before)
    assert torch.equal(got, want)
