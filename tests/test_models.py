"""base_model forms and their errors; what trains and what stays frozen."""

import pytest
import torch

from furlib import models


def test_tiny_is_seeded_and_sd_factor_8():
    a, b = models.load_vae("tiny-random", seed=1), models.load_vae("tiny-random", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    z = a.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert z.shape == (1, 4, 8, 8)
    assert not models.is_pretrained("tiny-random") and models.is_pretrained("tiny") and models.is_pretrained("stabilityai/sd-vae-ft-mse")


def test_split_trainable_freezes_encoder_side():
    vae = models.load_vae("tiny-random")
    names = {n for n, _ in models.split_trainable(vae)}
    assert names and all(n.startswith(("decoder.", "post_quant_conv.")) for n in names)
    assert not any(p.requires_grad for n, p in vae.named_parameters() if n.startswith(("encoder.", "quant_conv.")))


def test_local_folder_round_trip_and_bad_paths(tmp_path):
    vae = models.load_vae("tiny-random", seed=3)
    vae.save_pretrained(tmp_path / "vae")
    again = models.load_vae(str(tmp_path / "vae"))
    assert torch.equal(again.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        models.load_vae(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no such"):
        models.load_vae(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="does not exist"):
        models.load_vae(str(tmp_path / "missing.safetensors"))


def test_hub_id_offline_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="'tiny'.*'random:sd'") as caught:
        models.load_vae("someone/some-vae")
    message = str(caught.value)  # the project's words first, diffusers' after
    assert message.startswith("base_model 'someone/some-vae' is a Hugging Face Hub id, but the Hub cannot be reached")
    assert message.index("'random:sd'") < message.index("diffusers said")


def test_with_decoder_checks_keys():
    vae = models.load_vae("tiny-random")
    state = models.decoder_state(vae)
    state.pop("decoder.conv_out.bias")
    with pytest.raises(ValueError, match="missing"):
        models.with_decoder(vae, state)
