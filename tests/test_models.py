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


PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _no_network(monkeypatch):
    """No proxy, and name resolution fails in the socket module, as on a machine without network."""
    import socket

    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, f"no network for {host} (test)")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)


def test_hub_unreachable_answers_offline_in_ms(monkeypatch):
    """Not stubbed: the real check, with the network cut at the socket level. It once returned
    None after its proxy test (its body cut off by a move), so offline Hub bases retried ~41 s."""
    import time

    from furlib import runinfo

    _no_network(monkeypatch)
    start = time.monotonic()
    why = runinfo.hub_unreachable()
    assert time.monotonic() - start < 1.0
    assert isinstance(why, str) and why.startswith("cannot resolve ") and "no network" in why
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # a proxy resolves for us
    assert runinfo.hub_unreachable() == ""


def test_hub_unreachable_on_an_unresolvable_endpoint(monkeypatch):
    """A real lookup of a name that cannot exist (RFC 6761 ``.invalid``): unreachable, quickly."""
    import time

    from huggingface_hub import constants

    from furlib import runinfo

    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.furception.invalid")
    start = time.monotonic()
    why = runinfo.hub_unreachable()
    assert time.monotonic() - start < 10.0
    assert why.startswith("cannot resolve hub.furception.invalid")


def test_hub_base_offline_fails_fast_without_the_offline_flag(monkeypatch):
    """No HF_HUB_OFFLINE: the unreachable Hub alone must make the load local-only and quick."""
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _no_network(monkeypatch)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="the Hub cannot be reached \\(cannot resolve"):
        models.load_vae("someone/some-vae")
    assert time.monotonic() - start < 5.0


def test_with_decoder_checks_keys():
    vae = models.load_vae("tiny-random")
    state = models.decoder_state(vae)
    state.pop("decoder.conv_out.bias")
    with pytest.raises(ValueError, match="missing"):
        models.with_decoder(vae, state)
