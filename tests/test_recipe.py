"""The card's recipe, as the profiles that claim it train it (issue 12): loss weights in
plain-mean units, the author's later schedule, the critic's norm, weight decay."""

import dataclasses
from pathlib import Path

import pytest
import torch

from furlib.pipeline import load_profile
from furlib.training.losses import PatchCritic, PixelLayerNorm
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


def accum_trainer(accum: int, batch: int = 8, world_size: int = 1):
    from furlib.models import load_vae
    from furlib.perceptual import LPIPS
    from furlib.training.trainer import Trainer

    torch.manual_seed(0)
    s = TrainSettings(batch_size=batch, grad_accum=accum, warmup_steps=0, lr=1e-12, weight_decay=0.0,
                      mixed_precision="no", latent_mode="mode", critic_channels=8, critic_layers=2)
    return Trainer(load_vae("tiny", seed=0), s, "cpu", LPIPS("vgg", "random", seed=0), world_size=world_size)


@pytest.fixture(scope="module")
def one_batch():
    """The batch, and one step on it whole: its adaptive weight and decoder gradient, and LDM's
    weight through plain autograd on it. The same for every accum (seeded), so computed once."""
    from furlib.training.losses import generator_loss, reference_adaptive_weight

    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    one = accum_trainer(1)
    logs_one = one.step(x)  # the gradients stay in .grad after the step
    want = torch.cat([p.grad.flatten() for _, p in one.trainable])
    ref = accum_trainer(1)
    recon = ref.vae.decode(ref.vae.encode(x).latent_dist.mode()).sample
    rec, _ = ref.rec_loss(recon, x, *ref.s.loss_weights(0), ref.s.lpips_weight)
    gan = generator_loss(ref.critic(recon), ref.s.gan_loss)
    w = reference_adaptive_weight(rec, gan, ref.vae.decoder.conv_out.weight, ref.s.disc_weight)
    return x, float(logs_one["gan/weight"]), want, float(w)


@pytest.mark.parametrize("accum", (2, 4, 8))
def test_grad_accum_keeps_the_whole_batchs_adaptive_weight_and_gradient(accum, one_batch):
    """The card's weight is set for the step's batch: over 2, 4 or 8 micro-batches the weight
    and the decoder's gradient are one batch's, to float tolerance (issue 26: per micro-batch,
    the critic's share was 0.53 / 0.55 / 0.50 instead of 0.5). The one-batch weight itself is
    LDM's, through plain autograd on the whole batch."""
    x, weight_one, want, w = one_batch
    acc = accum_trainer(accum)
    logs_acc = acc.step(x)
    assert float(logs_acc["gan/weight"]) == pytest.approx(weight_one, rel=1e-4)  # seen: 1.6e-5
    got = torch.cat([p.grad.flatten() for _, p in acc.trainable])
    assert (got - want).norm() <= 1e-3 * want.norm(), float((got - want).norm() / want.norm())  # seen: 4e-4 at 8
    assert weight_one == pytest.approx(w, rel=1e-4)


def test_grad_accum_averages_the_critics_gradient():
    """Without the penalty's random interpolates (gp_weight 0) the WGAN critic loss is linear in
    the batch means: 2 micro-batches must give one batch's critic gradient (a sum would double it)."""
    grads = []
    for accum in (1, 2):
        t = accum_trainer(accum, batch=4)
        t.s.gp_weight = 0.0
        t.step(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1)
        grads.append(torch.cat([p.grad.flatten() for p in t.critic.parameters()]))
    assert (grads[1] - grads[0]).norm() <= 1e-4 * grads[0].norm()


def test_decoder_warms_up_and_the_critic_does_not():
    """As in the author's code: the decoder's lr rises linearly over warmup_steps, the critic's
    optimizer runs at its rate from step 0."""
    from types import SimpleNamespace

    from furlib.training.trainer import Trainer

    s = TrainSettings(lr=5e-7, critic_lr=5e-7, warmup_steps=5000)
    t = SimpleNamespace(s=s, opt=SimpleNamespace(param_groups=[{}]), opt_critic=SimpleNamespace(param_groups=[{}]))
    t.set_lr = Trainer.set_lr.__get__(t)  # the method alone, on stand-in optimizers
    t.set_lr(0)
    assert t.opt.param_groups[0]["lr"] == pytest.approx(5e-7 / 5000)
    assert t.opt_critic.param_groups[0]["lr"] == pytest.approx(5e-7)
    t.set_lr(10_000)
    assert t.opt.param_groups[0]["lr"] == pytest.approx(5e-7)
