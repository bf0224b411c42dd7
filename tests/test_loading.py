"""Honest loading of user checkpoints: a role loads only when the checkpoint really is that
kind of model, carries the weights of the role's head, and comes with a tokenizer.
Each case is a small folder saved here and loaded through the hub kit's own path."""

import shutil

import pytest
import transformers as tf

import mmcore
from mmcore import hub, tiny


def saved(model_cls, name: str, tmp_path, tokenizer=True):
    """The tiny BERT's weights saved as `model_cls` (with its tokenizer unless told not)."""
    folder = tmp_path / name
    model_cls.from_pretrained(tiny.folder("bert")).save_pretrained(folder)
    if tokenizer:
        tf.AutoTokenizer.from_pretrained(tiny.folder("bert")).save_pretrained(folder)
    return str(folder)


def load(role: str, source: str):
    return mmcore.load_kit("tiny", **{role: source}).model(role)


def test_a_bert_is_not_a_causal_lm(tmp_path):
    # transformers would build a BertLMHeadModel from it and generate garbage
    with pytest.raises(mmcore.ModelUnavailable, match="not a causal .*language model"):
        load("causal_lm", str(tiny.folder("bert")))


def test_a_masked_lm_checkpoint_has_no_nsp_head(tmp_path):
    folder = saved(tf.BertForMaskedLM, "mlm-only", tmp_path)
    with pytest.raises(mmcore.ModelUnavailable, match=r"lacks weights .*cls\.seq_relationship"):
        load("next_sentence", folder)
    assert load("masked_lm", folder)          # the role it was saved for loads


def test_a_bare_encoder_has_no_masked_lm_head(tmp_path):
    folder = saved(tf.BertModel, "encoder-only", tmp_path)
    with pytest.raises(mmcore.ModelUnavailable, match=r"lacks weights .*cls\.predictions"):
        load("masked_lm", folder)


def test_a_folder_without_tokenizer_files_is_refused_by_name(tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in tiny.folder("gpt2").iterdir():
        if f.name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(f, folder / f.name)
    with pytest.raises(mmcore.ModelUnavailable, match="no usable tokenizer"):
        load("causal_lm", str(folder))


def test_the_kits_own_checkpoints_pass_every_check(tiny_kit):
    for role in mmcore.ROLES:
        assert tiny_kit.model(role)
    config = tf.AutoConfig.from_pretrained(tiny.folder("gpt2"))
    assert hub.is_causal_checkpoint(config)
    assert not hub.is_causal_checkpoint(tf.AutoConfig.from_pretrained(tiny.folder("bert")))
    decoder = tf.BertConfig(is_decoder=True, architectures=["BertLMHeadModel"])
    assert hub.is_causal_checkpoint(decoder)          # a BERT trained as a decoder is one
