"""The loader registry and the typed role objects a kit holds."""

import pytest
import torch

import mmcore
from mmcore import fill_mask, hub, kits, loaders, nsp, tiny
from mmcore.dual_encoder import ClipEncoder
from mmcore.roles import CausalLM, MaskedLM, NSPHead


def test_each_role_is_a_typed_object_and_the_encoder_is_built_at_load(tiny_kit):
    assert isinstance(tiny_kit.model("masked_lm"), MaskedLM)
    assert isinstance(tiny_kit.model("next_sentence"), NSPHead)
    assert isinstance(tiny_kit.model("causal_lm"), CausalLM)
    assert isinstance(tiny_kit.model("dual_encoder"), ClipEncoder)
    # the encoder is the role object itself: nothing is written into the shared registry
    assert tiny_kit.encoder() is tiny_kit.model("dual_encoder")
    kinds = {r["role"]: r["kind"] for r in tiny_kit.describe()}
    assert kinds == {"masked_lm": "MaskedLM", "next_sentence": "NSPHead",
                     "causal_lm": "CausalLM", "dual_encoder": "ClipEncoder"}


def test_a_new_model_kind_is_one_loader_and_its_registry_line(tiny_kit, monkeypatch):
    calls = []

    def load_mine(spec, role, device, precision):
        calls.append(role)
        model, tok = hub.load_role("causal_lm", str(tiny.folder("gpt2")), device)
        return CausalLM(model, tok, spec.name)

    monkeypatch.setitem(loaders.LOADERS, "mine",
                        loaders.Loader(load_mine, {"causal_lm": CausalLM}, lambda r, s: None))
    mine = kits.ModelSpec("mine", "anything", "my model", "MIT")
    kit = kits.Kit("custom", {**tiny_kit.specs, "causal_lm": mine}, precision="exact")
    kit.preflight()
    got = kit.generate("the cat sat", max_new_tokens=8, chat=False)
    assert got == tiny_kit.generate("the cat sat", max_new_tokens=8, chat=False)
    assert list(kit.stream("the cat sat", max_new_tokens=8, chat=False))
    assert calls == ["causal_lm"] and kit.model("causal_lm").name == "my model"
    assert kit.describe()[2]["kind"] == "CausalLM" and kit.status("causal_lm") == "ready"
    other = kits.Kit("custom", {**tiny_kit.specs, "masked_lm": mine}, precision="exact")
    with pytest.raises(mmcore.ModelUnavailable, match="cannot serve the masked_lm role"):
        other.model("masked_lm")
    kits.release(kit, keep=tiny_kit)


def test_a_role_without_the_task_is_refused_by_name(tiny_kit):
    with pytest.raises(mmcore.InputError, match="tiny random BERT \\(NSP head\\) cannot fill"):
        fill_mask.fill(tiny_kit.model("next_sentence"), "The [MASK] sat.")
    with pytest.raises(mmcore.InputError, match="cannot score sentence pairs"):
        nsp.next_sentence(tiny_kit.model("masked_lm"), "It rained.", "The street was wet.")
    with pytest.raises(mmcore.InputError, match="cannot fill masks"):
        fill_mask.fill(tiny_kit.model("dual_encoder"), "The [MASK] sat.")


def test_nsp_head_runs_a_batch_of_pairs_as_transformers_runs_each(tiny_kit):
    """preprocess -> forward -> postprocess on a batch (padded) equals each pair alone
    through the transformers model."""
    head = tiny_kit.model("next_sentence")
    pairs = [("It rained all day.", "The streets were wet."), ("Hi.", "Whales migrate far "
             "every year, across whole oceans."), ("The bakery opens at six.", "Bread.")]
    batched = head.postprocess(head.forward(head.preprocess(pairs)))
    want = []
    with torch.no_grad():
        for a, b in pairs:
            logits = head.model(**head.tokenizer(a, b, return_tensors="pt")).logits
            want.append(float(logits.softmax(-1)[0, 0]))
    assert batched == pytest.approx(want, abs=1e-5)
    assert tiny_kit.next_sentence(*pairs[1]) == pytest.approx(want[1], abs=1e-6)
