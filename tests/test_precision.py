"""Precision: the weight forms are what they claim, and `fast` keeps quality on real weights.

The quality gates compare the offline kit at `fast` against the same kit at `exact` (fp32,
the GGUF dequantised: the Q4_1 reference model): the fill-mask probes, the zero-shot
photos, greedy tokens on five prompts and perplexity on a packaged paragraph.
"""

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch

import mmcore
from mmcore import generation as G
from mmcore import kits, memory, offline, precision, quantized_lm

DATA = Path(__file__).parent / "data"
CAP = precision.capability()
needs_fast = pytest.mark.skipif(not (CAP.bf16 and CAP.int4_kernel and CAP.int8_kernel),
                                reason="this CPU/torch has no fast bf16 / int4 / int8 path")
PROMPTS = ["The history of the printing press begins in the fifteenth century, when a "
           "goldsmith from Mainz named",
           "Write a short poem about the sea.",
           "What is the capital of France?",
           "Explain photosynthesis to a child.",
           "List three uses of copper."]
NEAR_TIE = 0.5        # logits: exact's best and second best closer than this are a coin toss


@pytest.fixture(scope="module")
def exact():
    return mmcore.load_kit("offline", precision="exact")


@pytest.fixture(scope="module")
def fast():
    return mmcore.load_kit("offline", precision="fast")


# ---------------------------------------------------------------- the forms themselves

def test_capability_is_detected_and_printable():
    line = CAP.line()
    assert CAP.isa and CAP.threads == torch.get_num_threads()
    for word in ("bf16", "VNNI", "AMX", "threads", CAP.isa):
        assert word in line


def test_precision_choice():
    assert precision.resolve("exact", "cpu") == "exact"
    assert precision.resolve("FAST", "cpu") == "fast"
    assert precision.resolve("auto", "cpu") in precision.PRECISIONS
    with pytest.raises(mmcore.InputError, match="exact, fast or auto"):
        precision.resolve("int3", "cpu")


def test_q4_1_blocks_decode_as_gguf_does():
    """Our reading of Q4_1 blocks against gguf's own (the real file's blocks are checked
    against transformers' dequantisation below)."""
    import gguf
    import numpy as np

    weights = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q4_1)
    ours = quantized_lm.dequantized(raw).numpy()
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1).reshape(ours.shape)
    assert (ours == theirs).all() and np.abs(ours - weights).max() < 0.3


@needs_fast
def test_int4_layers_hold_the_gguf_weights_exactly(exact):
    """Every 4-bit linear's weight is the fp32 weight transformers dequantised, bit for bit,
    and the kernel with fp32 scales reproduces it exactly."""
    model = exact.model("causal_lm").model
    rows = quantized_lm.read_q4_1(offline.smollm2_gguf(), model.config)
    state = model.state_dict()
    assert len(rows) == 7 * model.config.num_hidden_layers
    for name, raw in rows.items():
        assert torch.equal(quantized_lm.dequantized(raw), state[f"{name}.weight"]), name
    name = "model.layers.0.self_attn.k_proj"              # rows permuted, like every q/k
    q, d, m = (torch.from_numpy(a) for a in quantized_lm.q4_1_blocks(rows[name]))
    layer = precision.Int4Linear.from_q4_1(q, d, m, torch.float32)
    assert torch.equal(layer.weight, state[f"{name}.weight"])


@needs_fast
def test_int4_stacked_parts_equal_their_own_layers():
    """q/k/v as one 4-bit product (the parts' Q4_1 rows stacked, then packed): each part's
    columns are its own layer's output bit for bit, at one row and at many, row counts
    that do not fill the kernel's row blocks included; a part fed an input alone answers."""
    torch.manual_seed(0)
    sizes, blocks = [64, 32, 32], []
    for rows in sizes:
        blocks.append((torch.randint(0, 16, (rows, 128)), torch.rand(rows, 4) * 0.01,
                       -torch.rand(rows, 4) * 0.05))
    layers = [precision.Int4Linear.from_q4_1(*b, torch.bfloat16) for b in blocks]
    stacked = precision.Int4Linear.from_q4_1(*(torch.cat(x) for x in zip(*blocks)),
                                            torch.bfloat16)
    parent = torch.nn.Module()
    names = ("q_proj", "k_proj", "v_proj")
    precision.install_fused(parent, names, stacked, sizes)
    for rows in (1, 7, 64):
        x = torch.randn(2, rows, 128)
        got = [getattr(parent, n)(x) for n in names]
        for out, layer in zip(got, layers):
            assert torch.equal(out, layer(x))
    assert torch.equal(parent.v_proj(x[0]), layers[2](x[0]))
    assert torch.equal(parent.k_proj.weight, layers[1].weight)


@needs_fast
def test_fast_offline_lm_runs_qkv_and_gate_up_as_one_4bit_product_each(fast, exact):
    """Per layer 4 4-bit products (q/k/v, o, gate/up, down), not 7; every part's weight is
    still the GGUF's (the fp32 model's, dequantised), rows in transformers' order."""
    model = fast.model("causal_lm").model
    if not any(isinstance(m, precision.Int4Linear) for m in model.modules()):
        pytest.skip("no 4-bit form on this CPU")
    layers = model.config.num_hidden_layers
    assert sum(isinstance(m, precision.Int4Linear) for m in model.modules()) == 4 * layers
    assert sum(isinstance(m, precision.SharedInputPart) for m in model.modules()) == 5 * layers
    state = exact.model("causal_lm").model.state_dict()
    attention, mlp = model.model.layers[3].self_attn, model.model.layers[3].mlp
    for name, part in (("self_attn.k_proj", attention.k_proj), ("mlp.up_proj", mlp.up_proj)):
        want = state[f"model.layers.3.{name}.weight"]
        assert torch.allclose(part.weight.float(), want, atol=0.02 * want.abs().max())


@needs_fast
def test_int8_linear_is_close_and_conv1d_is_covered(tiny_kit):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = precision.Int8Linear.from_linear(linear, torch.bfloat16)
    x = torch.randn(5, 64)
    err = (q(x) - linear(x)).norm() / linear(x).norm()
    assert q(x).dtype == torch.float32 and err < 0.02
    fast_tiny = mmcore.load_kit("tiny", precision="fast")
    model = fast_tiny.model("causal_lm").model                    # GPT-2: Conv1D
    assert not [m for m in model.modules() if type(m).__name__ in ("Conv1D", "Linear")]
    assert fast_tiny.generate("hello", max_new_tokens=4, chat=False) is not None


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="this torch has no oneDNN")


@needs_onednn
def test_onednn_linear_is_torch_linear_in_another_layout():
    """Same fp32 products as nn.Linear / GPT-2's Conv1D (sums in another order), any input
    shape or layout, and the dense weight back bit for bit."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    for module in (torch.nn.Linear(64, 48), torch.nn.Linear(64, 48, bias=False),
                   Conv1D(48, 64)):
        torch.nn.init.normal_(module.weight)
        one = precision.OneDNNLinear.from_module(module)
        with torch.inference_mode():
            torch.testing.assert_close(one(x), module(x), rtol=1e-5, atol=1e-4)
            columns = torch.randn(64, 7).T                               # not contiguous
            torch.testing.assert_close(one(columns), module(columns), rtol=1e-5, atol=1e-4)
            assert one(torch.randn(0, 64)).shape == (0, 48)
        dense = module.weight if isinstance(module, torch.nn.Linear) else module.weight.T
        assert torch.equal(one.weight, dense) and one.out_features == 48
        state = one.state_dict()
        assert torch.equal(state["weight"], dense) and "packed" not in state
        other = precision.OneDNNLinear(torch.zeros(48, 64), module.bias)
        other.load_state_dict(state)
        assert torch.equal(other.weight, dense)
        twin = copy.deepcopy(one)                          # torch cannot copy oneDNN tensors
        assert twin.packed is not one.packed and torch.equal(twin.weight, dense)
        shared = copy.deepcopy(one, {id(one.packed): one.packed})
        assert shared.packed is one.packed


def test_fp32_gemm_goes_to_onednn_only_where_mkl_is_slow(monkeypatch):
    import dataclasses

    monkeypatch.delenv("MMCORE_FP32_GEMM", raising=False)
    for vendor, expected in (("GenuineIntel", False), ("AuthenticAMD", True), ("", False)):
        monkeypatch.setattr(precision, "capability",
                            lambda v=vendor: dataclasses.replace(CAP, vendor=v))
        usable = (torch.backends.mkldnn.is_available() and torch.backends.mkl.is_available()
                  and __import__("platform").machine() == "x86_64")
        assert precision.onednn_fp32_pays() == (expected and usable), vendor
    monkeypatch.setenv("MMCORE_FP32_GEMM", "mkl")
    assert not precision.onednn_fp32_pays()
    monkeypatch.setenv("MMCORE_FP32_GEMM", "onednn")
    assert precision.onednn_fp32_pays() == torch.backends.mkldnn.is_available()


@needs_onednn
def test_exact_on_onednn_gives_transformers_tokens(monkeypatch):
    """The offline LM with every linear on oneDNN: transformers' own greedy decoding gives
    the same 32 tokens as on the MKL model for the five prompts, through the kit's loader."""
    from mmcore import hub

    monkeypatch.setenv("MMCORE_FP32_GEMM", "onednn")
    spec = mmcore.load_kit("offline", precision="exact").spec("causal_lm")
    ours = kits._load(spec, "causal_lm", "cpu", "exact")          # uncached: a new load
    assert "oneDNN" in ours.precision
    assert sum(isinstance(m, precision.OneDNNLinear) for m in ours.model.modules()) == 211
    reference, tok = hub.load_role("causal_lm", str(offline.smollm2_folder()), "cpu")
    assert not any(isinstance(m, precision.OneDNNLinear) for m in reference.modules())
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        got, want = (m.generate(**ids, max_new_tokens=32, do_sample=False)
                     for m in (ours.model, reference))
        assert got.tolist() == want.tolist(), prompt
    with torch.inference_mode():
        ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
        torch.testing.assert_close(ours.model(ids).logits, reference(ids).logits,
                                   rtol=1e-4, atol=2e-3)
    # memory is counted with oneDNN's pointer-less tensors (the Models tab's footprint):
    # the same weights, plus the tied head's own packed copy
    head = reference.get_output_embeddings().weight
    assert memory.own_bytes(ours, set()) == memory.own_bytes(reference, set()) + \
        head.numel() * head.element_size()


def test_registry_keys_on_precision(exact):
    again = mmcore.load_kit("offline", precision="exact")
    assert again is exact and again.model("causal_lm") is exact.model("causal_lm")
    keys = [k for k in kits._registry if k[0] == "smollm2-gguf"]
    assert len(keys) == len(set(keys))
    assert all(k[-1] in precision.PRECISIONS for k in kits._registry)


# ---------------------------------------------------------------- quality gates, real weights

@needs_fast
def test_fast_shares_one_quantized_lm_and_says_so(fast, exact):
    lm = fast.model("causal_lm").model
    assert fast.model("masked_lm").model is lm
    assert fast.model("next_sentence").model is lm
    assert lm is not exact.model("causal_lm").model
    assert sum(isinstance(m, precision.Int4Linear) for m in lm.modules()) == 4 * 30
    fast.model("dual_encoder")
    rows = {r["role"]: r["precision"] for r in fast.describe()}
    assert "4-bit" in rows["causal_lm"]
    assert rows["dual_encoder"].startswith("fast: bf16" if precision.encoders_bf16() else "fp32")
    assert all(r["precision"].startswith("exact") for r in exact.describe()
               if r["status"] == "ready")


@needs_fast
@pytest.mark.timeout(1800)    # 2 x 50 probes: ~1-2 min quiet, far more on a shared 2-core box
def test_fill_mask_probes_score_the_same(fast, exact):
    with open(DATA / "fill_mask_probes.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))

    def hits(kit):
        return sum(kit.fill_mask(r["sentence"], top_k=1)[0][0]["token_str"].lower()
                   == r["answer"].lower() for r in rows)

    h_exact, h_fast = hits(exact), hits(fast)
    print(f"fill-mask probes top-1: exact {h_exact}/{len(rows)}, fast {h_fast}/{len(rows)}")
    assert abs(h_fast - h_exact) <= 1


@needs_fast
def test_nsp_pairs_score_the_same(fast, exact):
    """NSP at `fast` scores on the int8 x int8 twin where the CPU has int8 dot products: the
    labelled pairs (real and shuffled) are told apart as well as at `exact`."""
    from mmcore import nsp

    pairs = nsp.labelled_pairs()

    def accuracy(kit):
        return sum((kit.next_sentence(a, b) > 0.5) == bool(y) for a, b, y in pairs) / len(pairs)

    a_exact, a_fast = accuracy(exact), accuracy(fast)
    print(f"NSP pairs: exact {a_exact:.3f}, fast {a_fast:.3f} of {len(pairs)}")
    assert a_exact > 0.75 and abs(a_fast - a_exact) <= 0.05


@needs_fast
def test_zero_shot_photos_score_the_same(fast, exact, monkeypatch):
    """The kit at `fast`, and the ConSE tower in bf16 (forced: on CPUs where bf16 does not
    pay, `fast` keeps encoders fp32), against `exact`."""
    from skimage import data as skdata
    from PIL import Image

    from mmcore.zero_shot import zero_shot

    fast_encoder = fast.encoder()          # as this CPU chooses (before bf16 is forced below)
    conv = next(m for m in fast_encoder.image_model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)   # at fp32 or bf16
    monkeypatch.setenv("MMCORE_ENCODER_BF16", "1")
    bf16 = kits._load(exact.spec("dual_encoder"), "dual_encoder", torch.device("cpu"), "fast")
    assert next(bf16.image_model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():                  # the same class embeddings as `exact`
        bf16.image_projection.weight.copy_(exact.encoder().image_projection.weight)
    cases = json.loads((DATA / "zero_shot_photos.json").read_text())
    photos = {n: Image.fromarray(getattr(skdata, n)()).convert("RGB") for n in cases}

    def score(encoder):
        return sum(zero_shot(encoder, photos[n], labels).ranked[0][0] == labels[0]
                   for n, labels in cases.items())

    # `fast`: bf16 where it pays, else fp32; its conv tower channels-last either way
    encoders = {"exact": exact.encoder(), "bf16 tower": bf16, "fast": fast_encoder}
    got = {name: score(enc) for name, enc in encoders.items()}
    print(f"zero-shot photos (of {len(cases)}): {got}")
    assert all(abs(v - got["exact"]) <= 1 for v in got.values())
    image = photos["chelsea"]
    cos = torch.nn.functional.cosine_similarity(exact.encode_images([image]),
                                                bf16.encode_images([image]))
    assert float(cos) > 0.99


def _conv_bn(misordered: bool = False):
    """A conv, a timm BatchNormAct2d declared after it, and a second conv; `misordered` runs
    the norm after the second conv instead."""
    from timm.layers import BatchNormAct2d

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, bias=False)
            self.bn = BatchNormAct2d(8, act_layer=torch.nn.ReLU)
            self.conv2 = torch.nn.Conv2d(8, 8, 1)

        def forward(self, x):
            x = self.conv1(x)
            return self.bn(self.conv2(x)) if misordered else self.conv2(self.bn(x))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.normal_()
        net.bn.bias.normal_()
    return net.eval()


def test_folding_norms_into_convs_keeps_the_function_or_is_refused():
    net = _conv_bn()
    twin = precision.folded_twin(net, size=32)
    assert twin is not None and not any(isinstance(m, torch.nn.BatchNorm2d)
                                         for m in twin.modules())
    assert isinstance(net.bn, torch.nn.BatchNorm2d)                   # the original is kept
    x = torch.randn(4, 3, 20, 20)
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), net(x), rtol=1e-4, atol=1e-5)
    assert precision.folded_twin(_conv_bn(misordered=True), size=32) is None
    assert precision.folded_twin(torch.nn.Conv2d(3, 8, 3), size=32) is None   # nothing to fold


def test_fast_image_tower_runs_a_copy_with_its_norms_folded(fast):
    from skimage import data as skdata
    from PIL import Image

    enc = fast.encoder()
    twin = enc.serving_image_model
    assert twin is not None and "folded" in enc.precision
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in twin.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.image_model.modules())
    assert not any(k.startswith("serving") for k in enc.state_dict())   # never saved
    image = Image.fromarray(skdata.chelsea())
    folded = enc.encode_images([image])
    try:
        enc.set_serving_image_model(None)
        plain = enc.encode_images([image])
    finally:
        enc.set_serving_image_model(twin)
    assert float(torch.nn.functional.cosine_similarity(folded, plain)) > 0.999
    # a fork that trains the image tower copies the tower as it is, without the folded copy
    assert enc.trainable_copy("image", "t").serving_image_model is None
    assert enc.trainable_copy("projections", "t").serving_image_model is twin


def _greedy(kit, prompt, n=32):
    run = G.Generation(G.SamplingParams())
    for _ in G.generate_tokens(*_lm(kit), prompt, G.SamplingParams(max_new_tokens=n), run=run):
        pass
    return run


def _lm(kit):
    lm = kit.model("causal_lm")
    return lm.model, lm.tokenizer


@needs_fast
def test_greedy_tokens_follow_the_q4_1_reference(fast, exact):
    """On the reference's own 32 greedy tokens (teacher forcing, so one early coin toss does
    not decide the rest), `fast` picks the same token wherever the reference is not at a
    near-tie; and free-running it matches the reference until the first such tie."""
    _, tok = _lm(exact)
    model_f, _ = _lm(fast)
    ties = 0
    for prompt in PROMPTS:
        ref = _greedy(exact, prompt)
        ids = G.prompt_ids(tok, prompt, G.use_chat(tok, None)) + [t.token_id for t in ref.tokens]
        start = len(ids) - len(ref.tokens) - 1
        with torch.inference_mode():
            lf = model_f(input_ids=torch.tensor([ids])).logits[0, start:-1].float()
        # the reference's choice and its top-2 gap, from its own reported probabilities
        margin = torch.tensor([math.log(t.alternatives[0][1] / t.alternatives[1][1])
                               for t in ref.tokens])
        agree = lf.argmax(-1) == torch.tensor([t.token_id for t in ref.tokens])
        assert bool((agree | (margin < NEAR_TIE)).all()), (prompt, margin[~agree])
        ties += int((~agree).sum())
        mine = [t.token_id for t in _greedy(fast, prompt).tokens]
        first = next((i for i, (a, b) in enumerate(zip(mine, ids[start + 1:])) if a != b),
                     len(mine))
        at = f" (reference's top-2 logit gap there {float(margin[first]):.3f})" \
            if first < len(mine) else ""
        print(f"{prompt[:30]!r}: free-running match {first}/{len(ref.tokens)}{at}, "
              f"near-ties flipped {int((~agree).sum())}")
        if first < len(mine):                       # a divergence must start at a near-tie
            assert float(margin[first]) < NEAR_TIE
    assert ties <= 3


@needs_fast
def test_perplexity_within_two_percent(fast, exact):
    from mmcore import lm_scoring, tiny

    text = " ".join(line.strip() for line in tiny.SENTENCES.splitlines() if line.strip())

    def perplexity(kit):
        model, tok = _lm(kit)
        ids = [lm_scoring.start_id(tok)] + lm_scoring.encode(tok, text)
        with torch.inference_mode():
            logp = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        return math.exp(-float(logp[torch.arange(len(ids) - 1), ids[1:]].mean()))

    p_exact, p_fast = perplexity(exact), perplexity(fast)
    print(f"perplexity: exact {p_exact:.3f}, fast {p_fast:.3f}")
    assert abs(p_fast / p_exact - 1) < 0.02


@needs_fast
def test_probabilities_alternatives_and_attention_in_fast(fast):
    from mmcore import attention

    run = _greedy(fast, "The capital of France is", n=4)
    for info in run.tokens:
        assert 0 < info.prob <= 1 and len(info.alternatives) == G.TOP_ALTERNATIVES
        assert info.alternatives[0][1] >= info.alternatives[-1][1]
    for key in ("causal_lm", "text_tower"):
        maps = attention.attention_maps(fast, key, "The cat sat on the mat.")
        assert torch.allclose(maps.weights.sum(-1), torch.ones(()), atol=1e-2)
    assert 0 <= fast.next_sentence("I was hungry.", "So I ate a sandwich.") <= 1
