"""The card's recipe, as the profiles that claim it train it (issue 12): loss weights in
plain-mean units, the author's later schedule, the critic's norm, weight decay."""

import dataclasses
from pathlib import Path

import pytest
import torch

from furlib.pipeline import load_profile
from furlib.training.critic import PatchCritic, PixelLayerNorm
from furlib.training.settings import TrainSettings

ROOT = Path(__file__).resolve().parent.parent
CARD_PROFILES = ("furception_v1", "colab_t4", "author_schedule")  # every profile that claims the card


def profile_settings(name: str) -> TrainSettings:
    params = load_profile(ROOT / "params" / f"{name}.yaml")
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    return TrainSettings(**{k: v for k, v in params.items() if k in fields})


@pytest.mark.parametrize("name", ("furception_v1", "colab_t4"))
def test_card_profiles_weigh_mae_mse_lpips_1_5_1(name):
    """The author's MAE 1, MSE 10 on optax l2_loss (= 1/2 squared error), LPIPS 1 is 1 : 5 : 1
    in this project's plain-mean units, at every step."""
    s = profile_settings(name)
    for step in (0, 50_000, 150_000):
        assert s.loss_weights(step) == pytest.approx((1.0, 10.0 * 0.5))
    assert s.lpips_weight == 1.0


def test_plain_mean_mse_5_is_optax_l2_loss_10():
    pred, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    optax_l2_loss = 0.5 * (pred - target) ** 2  # optax.l2_loss, per element
    assert float(10.0 * optax_l2_loss.mean()) == pytest.approx(float(5.0 * (pred - target).pow(2).mean()))


def test_author_schedule_is_cosine_mae_1_to_0_6_with_mse_rising_from_0_to_2():
    """MAE: optax.cosine_decay_schedule(1.0, 100k, alpha=0.6); MSE: 10 (1 - MAE) on half squared
    error = 5 (1 - MAE) plain-mean, so it starts at 0 and rises as MAE falls."""
    import math

    s = profile_settings("author_schedule")
    for step in (0, 1, 25_000, 50_000, 99_999, 100_000, 150_000):
        t = min(step, 100_000) / 100_000
        optax_mae = 1.0 * ((1 - 0.6) * 0.5 * (1 + math.cos(math.pi * t)) + 0.6)
        mae, mse = s.loss_weights(step)
        assert mae == pytest.approx(optax_mae) and mse == pytest.approx(5.0 * (1.0 - optax_mae), abs=1e-12)
    assert s.loss_weights(0) == pytest.approx((1.0, 0.0))
    assert s.loss_weights(100_000) == pytest.approx((0.6, 2.0))
    assert s.lpips_weight == 1.0


@pytest.mark.parametrize("name", CARD_PROFILES)
def test_card_profiles_critic_normalises_channels_at_each_pixel(name):
    s = profile_settings(name)
    critic = PatchCritic(s.critic_layers, 8, s.critic_norm)
    norms = [m for m in critic.modules() if isinstance(m, (PixelLayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d))]
    assert norms and all(isinstance(m, PixelLayerNorm) for m in norms)
    assert s.gan_loss == "wgan-gp" and s.gp_weight == 10.0 and s.disc_weight == 0.5


@pytest.mark.parametrize("name", CARD_PROFILES)
def test_card_profiles_use_the_authors_weight_decay(name):
    assert profile_settings(name).weight_decay == pytest.approx(1e-4)


def test_defaults_are_the_card_recipe():
    s = TrainSettings()
    assert s.loss_weights(0) == (1.0, 5.0) and s.critic_norm == "pixel_layer" and s.weight_decay == 1e-4
