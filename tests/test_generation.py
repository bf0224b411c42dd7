"""Generation: token-identical to model.generate when greedy, reproducible when seeded,
stoppable within a token, and strict about its parameters."""

import threading

import pytest
import torch

import mmcore
from mmcore import generation as G


def ours_tokens(kit, prompt, **kw):
    lm = kit.model("causal_lm")
    run = G.Generation(G.SamplingParams())
    for _ in G.generate_tokens(lm.model, lm.tokenizer, prompt,
                               G.SamplingParams(**kw), run=run):
        pass
    return [t.token_id for t in run.tokens], run


def hf_tokens(kit, prompt, chat, **kw):
    lm = kit.model("causal_lm")
    model, tok = lm.model, lm.tokenizer
    ids = torch.tensor([G.prompt_ids(tok, prompt, chat)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         pad_token_id=tok.pad_token_id or tok.eos_token_id, **kw)
    new = out[0, ids.shape[1]:].tolist()
    eos = G.eos_ids(model, tok)
    return new[:-1] if new and new[-1] in eos else new


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_model_generate_tiny(tiny_kit, penalty):
    for prompt in ["the cat sat on the", "a photo of a rocket"]:
        ours, _ = ours_tokens(tiny_kit, prompt, max_new_tokens=40, repetition_penalty=penalty)
        assert ours == hf_tokens(tiny_kit, prompt, False, max_new_tokens=40,
                                 repetition_penalty=penalty)


@pytest.mark.parametrize("chat, prompt", [(True, "Write one sentence about the sea."),
                                          (False, "The sea is")])
def test_greedy_equals_model_generate_offline(offline_kit, chat, prompt):
    ours, run = ours_tokens(offline_kit, prompt, max_new_tokens=32, chat=chat)
    assert ours == hf_tokens(offline_kit, prompt, chat, max_new_tokens=32)
    assert run.text.strip()


def test_seeded_sampling_is_reproducible(tiny_kit):
    kw = dict(max_new_tokens=30, temperature=0.9, top_k=50, top_p=0.95)
    a = tiny_kit.generate("the cat", seed=7, **kw)
    assert a == tiny_kit.generate("the cat", seed=7, **kw)
    others = {tiny_kit.generate("the cat", seed=s, **kw) for s in range(8, 12)}
    assert len(others | {a}) > 1
    many = tiny_kit.generate("the cat", seed=7, num_candidates=3, **kw)
    assert many[0] == a and len(many) == 3


def test_top_k_one_is_greedy(tiny_kit):
    assert tiny_kit.generate("the cat", max_new_tokens=20, temperature=1.5, top_k=1, seed=3) == \
        tiny_kit.generate("the cat", max_new_tokens=20)


def test_per_token_probabilities_and_alternatives(tiny_kit):
    _, run = ours_tokens(tiny_kit, "the cat sat", max_new_tokens=10)
    for info in run.tokens:
        assert 0 < info.prob <= 1 and len(info.alternatives) == G.TOP_ALTERNATIVES
        # greedy: the chosen token is the likeliest alternative
        assert abs(info.alternatives[0][1] - info.prob) < 1e-6
    assert "".join(t.text for t in run.tokens) == run.text


def test_forced_alternative_regenerates_from_that_point(tiny_kit):
    ids, run = ours_tokens(tiny_kit, "the cat sat", max_new_tokens=10)
    alt = run.tokens[3].alternatives[1][2]
    forced = ids[:3] + [alt]
    lm = tiny_kit.model("causal_lm")
    again = G.Generation(G.SamplingParams())
    list(G.generate_tokens(lm.model, lm.tokenizer, "the cat sat",
                           G.SamplingParams(max_new_tokens=6), forced=forced, run=again))
    got = [t.token_id for t in again.tokens]
    assert got[:4] == forced and all(t.forced for t in again.tokens[:4])
    assert len(got) <= 4 + 6
    # the forced token's probability is the one the model gave it there
    assert abs(again.tokens[3].prob - run.tokens[3].alternatives[1][1]) < 1e-5


def test_stop_sequences_cut_the_output(offline_kit):
    out = offline_kit.generate("Count from 1 to 20, one number per line.", max_new_tokens=80,
                               stop=["7"])
    assert "7" not in out and "6" in out


def test_stop_event_ends_within_one_token_and_leaves_no_thread(tiny_kit):
    before = threading.active_count()
    stop = threading.Event()
    pieces = []
    for piece in tiny_kit.stream("the cat", max_new_tokens=200, stop_event=stop):
        pieces.append(piece)
        if len(pieces) == 3:
            stop.set()
    assert len(pieces) == 3
    # closing the generator (what Gradio's Stop does) ends it too
    gen = tiny_kit.stream("the cat", max_new_tokens=200)
    next(gen)
    gen.close()
    assert threading.active_count() == before


def test_one_users_stop_does_not_touch_another(tiny_kit):
    mine, theirs = threading.Event(), threading.Event()
    a = tiny_kit.stream("the cat", max_new_tokens=30, stop_event=mine, temperature=0)
    b = tiny_kit.stream("the cat", max_new_tokens=30, stop_event=theirs, temperature=0)
    next(a)
    mine.set()
    assert list(a) == []
    assert len(list(b)) > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be between 1 and 1024"),
    (dict(max_new_tokens=5000), "max_new_tokens must be between 1 and 1024"),
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(temperature=float("nan")), "NaN"),
    (dict(seed=float("inf")), "seed must be a finite number"),
    (dict(seed="1e400"), "seed must be a finite number"),
    (dict(num_candidates=50), "num_candidates"),
])
def test_bad_parameters_are_rejected(tiny_kit, kwargs, message):
    with pytest.raises(mmcore.InputError, match=message):
        tiny_kit.generate("the cat", **kwargs)


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"), ("  ", "empty"), ("x" * 1_000_000, "limit"), ("a \ud800 b", "surrogate"),
])
def test_bad_prompts_are_rejected(tiny_kit, prompt, message):
    with pytest.raises(mmcore.InputError, match=message):
        tiny_kit.generate(prompt)


def test_prompt_plus_new_tokens_must_fit_the_context(tiny_kit):
    with pytest.raises(mmcore.InputError, match=r"inputs \(\d+ tokens\) \+ max_new_tokens "
                                                 r"\(1000\) must be <= 1024"):
        tiny_kit.generate("the cat sat on the mat " * 40, max_new_tokens=1000)


def test_sampling_filters_match_transformers_warpers():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    # a small vocabulary, and SmolLM2's 49152 peaked (top_p's cut among the likeliest few
    # hundred: `TOP_P_CANDIDATES`) and flat (further down)
    for vocab, scale, top_k, top_p in ((1000, 3, 0, 0.9), (1000, 3, 50, 0.9), (1000, 3, 50, 1.0),
                                       (1000, 3, 5, 0.5), (49152, 4, 0, 0.9),
                                       (49152, 4, 0, 0.999), (49152, 0.5, 0, 0.9),
                                       (49152, 4, 100, 0.95), (1000, 1, 50, 1.0)):
        logits = torch.randn(vocab, generator=g) * scale
        if scale == 1:
            logits = logits.round()                     # many ties with the k-th: all kept
        ours = G._process(logits, None, G.SamplingParams(temperature=0.7, top_k=top_k,
                                                         top_p=top_p).check())
        theirs = TemperatureLogitsWarper(0.7)(None, logits[None].clone())
        if top_k:
            theirs = TopKLogitsWarper(top_k)(None, theirs)
        if top_p < 1:
            theirs = TopPLogitsWarper(top_p)(None, theirs)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs[0])), (vocab, scale, top_k, top_p)
        finite = ~torch.isinf(ours)
        torch.testing.assert_close(ours[finite], theirs[0][finite])


def test_a_drawn_token_follows_the_distribution_and_the_seed():
    """`draw` (one uniform number through the float64 CDF) samples softmax(logits): counts
    over 40,000 draws within 4 standard deviations of the probabilities, never a token
    filtered out (-inf), and the same tokens from the same seed."""
    vocab = 49152
    logits = torch.full((vocab,), float("-inf"))
    chosen = torch.tensor([3, 17, 4000, 30000, vocab - 1])
    logits[chosen] = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    logits[100:200] = -3.0                                 # a tail of a hundred small ones
    probs = logits.softmax(-1)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    counts = torch.bincount(torch.tensor([G.draw(logits, g) for _ in range(n)]),
                            minlength=vocab).double()
    assert counts[torch.isinf(logits)].sum() == 0
    for token in chosen.tolist() + [150]:
        p = float(probs[token])
        assert abs(counts[token] / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-4, token
    tail = float(probs[100:200].sum())
    assert abs(float(counts[100:200].sum()) / n - tail) < 4 * (tail / n) ** 0.5
    again = [G.draw(logits, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(again)) == 1
    one = torch.full((vocab,), float("-inf"))
    one[123] = 0.0
    assert {G.draw(one, g) for _ in range(50)} == {123}
    for broken in (float("nan"), float("inf")):              # a broken model: an error
        bad = torch.zeros(10)
        bad[3] = broken
        with pytest.raises(mmcore.InputError, match="not finite"):
            G.draw(bad, g)


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-46, 5e-324])
def test_a_tiny_temperature_samples_the_likeliest_token(tiny_kit, temperature):
    """Scores divided by a tiny temperature overflow to infinity; that must not read as a
    broken model ("not finite"): the distribution is the argmax's, with or without top-k,
    top-p and a repetition penalty, and generation runs."""
    logits = torch.tensor([1.0, 3.5, -2.0, 3.4999, float("-inf")])
    g = torch.Generator().manual_seed(0)
    for extra in ({}, {"top_k": 3}, {"top_p": 0.9}, {"repetition_penalty": 1.3}):
        p = G.SamplingParams(temperature=temperature, **extra).check()
        seen = torch.tensor([0])
        assert {G.draw(G._process(logits, seen, p), g) for _ in range(20)} == {1}
    lm = tiny_kit.model("causal_lm")
    runs = []
    for p in (G.SamplingParams(max_new_tokens=12),
              G.SamplingParams(max_new_tokens=12, temperature=temperature, seed=3)):
        runs.append(G.Generation(p))
        list(G.generate_tokens(lm.model, lm.tokenizer, "the cat", p, run=runs[-1]))
    assert [t.token_id for t in runs[1].tokens] == [t.token_id for t in runs[0].tokens]


def test_top_p_keeps_what_transformers_keeps_at_an_exact_boundary():
    from transformers import TopPLogitsWarper

    for logits, top_p in (([0.0, 0.0], 0.5), ([0.0, 0.0, 0.0, 0.0], 0.5),
                          ([1.0, 1.0, 0.0], 0.5)):
        x = torch.tensor(logits)
        ours = G._process(x, None, G.SamplingParams(temperature=1.0, top_p=top_p).check())
        theirs = TopPLogitsWarper(top_p)(None, x[None].clone())[0]
        assert int(torch.isfinite(ours).sum()) == int(torch.isfinite(theirs).sum()), logits


# ---------------------------------------------------------------- right answers (issue 12)

def hf_continuation(model, tok, ids, max_new_tokens):
    """Greedy `model.generate` on raw ids: the new tokens, without a final EOS."""
    ids = torch.tensor([ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new[:-1] if new and new[-1] in G.eos_ids(model, tok) else new


@pytest.mark.parametrize("cut", [0, 3])
def test_continuation_after_forced_tokens_equals_model_generate(tiny_kit, cut):
    """Regenerate-from-here: greedy after prompt + forced is model.generate on exactly
    prompt + forced (the last forced token is not fed twice)."""
    lm = tiny_kit.model("causal_lm")
    model, tok = lm.model, lm.tokenizer
    ids, run = ours_tokens(tiny_kit, "the cat sat", max_new_tokens=10)
    forced = ids[:cut] + [run.tokens[cut].alternatives[1][2]]
    again = G.Generation(G.SamplingParams())
    list(G.generate_tokens(model, tok, "the cat sat", G.SamplingParams(max_new_tokens=12),
                           forced=forced, run=again))
    got = [t.token_id for t in again.tokens]
    prompt = G.prompt_ids(tok, "the cat sat", False)
    assert got[:len(forced)] == forced
    assert got[len(forced):] == hf_continuation(model, tok, prompt + forced, 12)


def test_stream_never_shows_part_of_a_stop_sequence(tiny_kit):
    """A stop sequence that straddles two tokens: the stream holds back its first part."""
    full, run = ours_tokens(tiny_kit, "the cat sat", max_new_tokens=40)
    text, pieces = run.text, [t.text for t in run.tokens]
    bounds = [sum(len(p) for p in pieces[:i]) for i in range(1, len(pieces))]
    # a two-character stop across a token boundary, first found exactly there
    stop = next(text[b - 1:b + 1] for b in bounds
                if 0 < b < len(text) - 1 and text.find(text[b - 1:b + 1]) == b - 1)
    want = text[:text.find(stop)]
    assert tiny_kit.generate("the cat sat", max_new_tokens=40, stop=[stop]) == want
    shown = ""
    for piece in tiny_kit.stream("the cat sat", max_new_tokens=40, stop=[stop]):
        shown += piece
        assert want.startswith(shown), (shown, want)
    assert shown == want


def llama_style_tokenizer():
    """A small SentencePiece-style (Llama) tokenizer: Metaspace pre-tokenizer and decoder,
    byte fallback for characters outside the vocabulary."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["The capital of France is Paris.", "A photo of a cat on a red sofa.",
              "Hello world, hello there! The cat sat on the mat."] * 10
    special = ["<unk>", "<s>", "</s>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120,
                                                            special_tokens=special))
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    for b in range(256):                                   # Llama's <0xNN> byte tokens
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                     decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    tok.add_special_tokens(special)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers_to_check(tiny_kit):
    return {"gpt2": tiny_kit.model("causal_lm").tokenizer,
            "bert": tiny_kit.model("masked_lm").tokenizer,
            "llama": llama_style_tokenizer()}


def after_prompt(tok, prompt: list, new: list) -> str:
    """The reference: what `tok.decode` adds to the prompt's text when `new` follows it."""
    head = tok.decode(prompt, skip_special_tokens=True)
    whole = tok.decode(prompt + new, skip_special_tokens=True)
    assert whole.startswith(head)
    return whole[len(head):]


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("fast", [True, False])
def test_streamed_text_equals_decode_of_the_same_ids(tokenizers_to_check, name, fast):
    tok = tokenizers_to_check[name]
    prompt = tok("The capital of")["input_ids"]
    new = tok(" France is Paris. Héllo 🙂 world, the cat's sofa .",
              add_special_tokens=False)["input_ids"]
    for window in (prompt, []):
        detok = G._Detokenizer(tok, window, use_stream=fast)
        pieces = [detok.push(t) for t in new]
        assert "".join(pieces) == after_prompt(tok, window, new), (name, fast, window)
    if name == "llama":
        assert "".join(pieces) == tok.decode(new)                  # no prompt: as decode


def test_sentencepiece_model_streams_its_leading_spaces():
    """End to end on a tiny random Llama with a SentencePiece-style tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = llama_style_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():               # it writes whole words only: "▁"-initial tokens win
        words = torch.tensor([t.startswith("▁") for t in tok.convert_ids_to_tokens(
            list(range(len(tok))))])
        model.lm_head.weight[~words] = 0
        model.lm_head.weight[words] *= 10
    params = G.SamplingParams(max_new_tokens=20, chat=False)
    run = G.Generation(params)
    list(G.generate_tokens(model, tok, "The cat sat on the", params, run=run))
    want = after_prompt(tok, G.prompt_ids(tok, "The cat sat on the", False),
                        [t.token_id for t in run.tokens])
    assert want.startswith(" ")                       # the first token's leading space
    assert "".join(t.text for t in run.tokens) == run.text == want
    assert "".join(G.stream(model, tok, "The cat sat on the", params)) == want
