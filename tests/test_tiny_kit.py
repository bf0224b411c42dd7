"""The tiny kit: deterministic random models saved and loaded through the hub code path."""

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import mmcore
from mmcore import kits, tiny

CLASSES = {"masked_lm": "BertForMaskedLM", "next_sentence": "BertForNextSentencePrediction",
           "causal_lm": "GPT2LMHeadModel", "dual_encoder": "CLIPModel"}


@pytest.mark.parametrize("role", mmcore.ROLES)
def test_each_role_loads_its_class_in_eval_mode(tiny_kit, role):
    model = tiny_kit.model(role).model
    assert type(model).__name__ == CLASSES[role]
    assert not model.training
    assert next(model.parameters()).device.type == tiny_kit.device.type


def test_tiny_models_are_deterministic(tmp_path, monkeypatch):
    made = {}
    for run in ("a", "b"):
        monkeypatch.setenv("MMCORE_CACHE", str(tmp_path / run))
        made[run] = {name: tiny.folder(name) for name in tiny.BUILDERS}
    for name in tiny.BUILDERS:
        a = load_file(made["a"][name] / "model.safetensors")
        b = load_file(made["b"][name] / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert (made["a"][name] / "tokenizer.json").read_text() == \
            (made["b"][name] / "tokenizer.json").read_text()


def test_saved_and_loaded_bert_equals_the_model_built_in_memory(tiny_kit):
    from transformers import BertConfig, BertForPreTraining

    loaded = tiny_kit.model("masked_lm")
    config = BertConfig.from_pretrained(tiny_kit.spec("masked_lm").source)
    with tiny.seeded():
        fresh = BertForPreTraining(config).eval()
    tok = loaded.tokenizer
    batch = tok(["the capital of france is [MASK] ."], return_tensors="pt")
    with torch.no_grad():
        want = fresh(**batch).prediction_logits
        got = loaded.model(**batch).logits
        nsp_want = fresh(**batch).seq_relationship_logits
        nsp_got = tiny_kit.model("next_sentence").model(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(nsp_got, nsp_want, rtol=0, atol=1e-6)


def test_tokenizers_cover_any_text(tiny_kit):
    text = "The capital of Zürich? 42 ✓ naïve café"
    gpt = tiny_kit.model("causal_lm").tokenizer
    assert gpt.decode(gpt(text)["input_ids"]) == text          # byte-level: lossless
    bert = tiny_kit.model("masked_lm").tokenizer
    assert bert.mask_token == "[MASK]"
    assert bert.unk_token_id not in bert("the capital of paris")["input_ids"]
    proc = tiny_kit.model("dual_encoder").processor
    ids = proc(text=["a photo of a cat!"], return_tensors="pt")["input_ids"][0].tolist()
    assert proc.tokenizer.unk_token_id not in ids[1:-1]


def test_context_lengths_match_the_real_models(tiny_kit):
    cfg = {r: tiny_kit.model(r).model.config for r in mmcore.ROLES}
    assert cfg["masked_lm"].max_position_embeddings == 512
    assert cfg["causal_lm"].n_positions == 1024
    assert cfg["dual_encoder"].text_config.max_position_embeddings == 77


def test_kit_is_memoised_and_roles_load_once_under_concurrency(monkeypatch):
    assert mmcore.load_kit("tiny") is mmcore.load_kit("tiny")
    calls = []
    real = kits._load

    def slow_load(spec, role, device, precision="exact"):
        calls.append(role)
        time.sleep(0.2)
        return real(spec, role, device, precision)

    monkeypatch.setattr(kits, "_registry", {})
    monkeypatch.setattr(kits, "_load", slow_load)
    kit = mmcore.load_kit("tiny")
    monkeypatch.setattr(kit, "_held", {})               # as if this kit had loaded nothing
    results = []
    threads = [threading.Thread(target=lambda: results.append(kit.model("causal_lm")))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["causal_lm"]
    assert all(r is results[0] for r in results)


def test_unknown_kit_and_role_are_rejected():
    with pytest.raises(mmcore.InputError, match="Unknown kit"):
        mmcore.load_kit("huge")
    with pytest.raises(mmcore.InputError, match="Unknown role"):
        mmcore.load_kit("tiny", vision="x")
