"""The dual encoder's training surface: save -> load gives the same embeddings for every kind
(Hugging Face CLIP, the ConSE tower, a ConSE tower with trained towers, a tower built from
its config), and the encoder it was forked from is never changed."""

import pytest
import torch

from mmcore import dual_encoder as de

TEXTS = ["a large red circle on the left", "a small blue square"]


def perturb(params, seed: int = 0) -> None:
    """Move every given weight, so a load that missed one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01)


def same_embeddings(a, b, chelsea) -> None:
    torch.testing.assert_close(a.encode_images([chelsea]), b.encode_images([chelsea]),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(a.encode_texts(TEXTS), b.encode_texts(TEXTS), rtol=0, atol=1e-6)
    assert abs(a.logit_scale - b.logit_scale) < 1e-4


def test_clip_round_trips_as_a_clipmodel_folder(tiny_kit, chelsea, tmp_path):
    base = tiny_kit.encoder()
    tuned = base.trainable_copy("image", "tuned")
    perturb(tuned.trainable_parameters("image"))
    tuned.save(tmp_path / "clip")
    again = de.load_encoder(tmp_path / "clip")
    same_embeddings(again, tuned, chelsea)
    other = base.trainable_copy("image", "other")        # in place, into a fresh copy
    other.load(tmp_path / "clip")
    same_embeddings(other, tuned, chelsea)
    assert not torch.equal(base.encode_texts(TEXTS), tuned.encode_texts(TEXTS))


@pytest.mark.parametrize("part", ["projections", "text", "image"])
def test_conse_round_trips_on_its_base(offline_kit, chelsea, tmp_path, part):
    base = offline_kit.encoder()
    before = base.encode_texts(TEXTS), base.encode_images([chelsea])
    tuned = base.trainable_copy(part, "tuned")
    perturb(tuned.trainable_parameters(part))
    tuned.save(tmp_path / part, part=part)
    held = {p.name for p in (tmp_path / part).glob("*.safetensors")}
    assert held == {"head.safetensors"} | {f"{t}.safetensors" for t in de.TOWERS_TRAINED[part]}
    again = de.load_encoder(tmp_path / part, base=base)
    same_embeddings(again, tuned, chelsea)
    torch.testing.assert_close(base.encode_texts(TEXTS), before[0], rtol=0, atol=0)
    torch.testing.assert_close(base.encode_images([chelsea]), before[1], rtol=0, atol=0)


def test_a_tower_built_from_its_config_round_trips_without_a_base(chelsea, tmp_path):
    from mmcore import tiny

    cfg = de.TowerConfig(image_backbone="resnet10t", text_model=str(tiny.folder("bert")),
                         embed_dim=16)
    enc = de.build_tower(cfg)
    perturb(enc.trainable_parameters("image"))
    enc.save(tmp_path / "tower")
    again = de.load_encoder(tmp_path / "tower")         # its own random init, then the weights
    same_embeddings(again, enc, chelsea)


def test_a_checkpoint_of_another_model_is_refused(offline_kit, tiny_kit, tmp_path):
    tiny_kit.encoder().trainable_copy("projections", "x").save(tmp_path / "clip")
    with pytest.raises(de.InputError, match="no dual encoder"):
        de.load_encoder(tmp_path)
    cfg = de.TowerConfig(image_backbone="resnet10t", text_model=str(__import__(
        "mmcore.tiny").tiny.folder("bert")), embed_dim=16)
    de.build_tower(cfg).save(tmp_path / "small")
    with pytest.raises(de.InputError, match="another tower model"):
        offline_kit.encoder().trainable_copy("projections", "y").load(tmp_path / "small")


def test_load_encoder_is_what_the_kit_loads_for_a_checkpoint(offline_kit, chelsea, tmp_path):
    """The call the tower loader makes for a fine-tuned checkpoint, equal to the kit's load."""
    import mmcore

    base = offline_kit.encoder()
    tuned = base.trainable_copy("text", "tuned")
    perturb(tuned.trainable_parameters("text"))
    tuned.save(tmp_path / "ck", part="text")
    ours = de.load_encoder(tmp_path / "ck", base=base, name="finetuned-ck")
    kits = mmcore.load_kit("offline", dual_encoder=str(tmp_path / "ck")).encoder()
    assert ours.identity == kits.identity
    same_embeddings(ours, kits, chelsea)
