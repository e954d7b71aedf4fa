"""The recipe's terms: adaptive weight, single-backward equivalence, EMA, NaN skips, resume."""

import itertools
import math
import os
import shutil

import pytest
import torch

from furlib import checkpoint_pick
from furlib.training.losses import generator_loss
from furlib.training.ema import scaled_decay
from furlib.training.losses import reference_adaptive_weight
from furlib.models import decoder_state, load_vae
from furlib.perceptual import LPIPS
from furlib.training.settings import TrainSettings
from furlib.training.trainer import NonFiniteError, step_generator
from furlib.training.trainer import Trainer

RES = 32


def settings(**kw):
    base = dict(batch_size=2, max_steps=8, warmup_steps=0, lr=1e-3, critic_lr=1e-3, mixed_precision="no",
                critic_channels=8, critic_layers=2)
    return TrainSettings(**{**base, **kw})


def batch(step, n=2):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.rand(n, 3, RES, RES, generator=g) * 2 - 1


def make_trainer(**kw):
    return Trainer(load_vae("tiny-random", seed=0), settings(**kw), "cpu", LPIPS("vgg", "random", seed=0))


def test_ema_decay_scaled_to_batch():
    assert scaled_decay(192) == pytest.approx(0.999)
    assert scaled_decay(32) == pytest.approx(0.999833, abs=1e-6)  # the recipe's 1 - 0.001/6
    assert settings(batch_size=32).ema_decay_for(32) == pytest.approx(1 - 0.001 / 6, rel=1e-6)


def test_single_backward_matches_plain_ldm_loss():
    """Fast path (grads at the reconstruction + last-layer weight grads) == LDM's rec + w*gan."""
    t = make_trainer(latent_mode="mode")
    x = batch(0)
    z = t.encode(x, step_generator(t.device, 0, 0, 0))
    recon, logs = t.decoder_grads(x, z, gan_on=True, accum=1)
    fast = {n: p.grad.clone() for n, p in t.trainable}
    t.opt.zero_grad(set_to_none=True)

    recon = t.vae.decode(z).sample  # the plain way: autograd through the decoder three times
    rec, _ = t.rec_loss(recon, x, *t.s.loss_weights(0), t.s.lpips_weight)
    gan = generator_loss(t.critic(t.critic.prepare(recon)), "wgan-gp")
    w = reference_adaptive_weight(rec, gan, t.vae.decoder.conv_out.weight, 0.5)
    (rec + w * gan).backward()
    assert float(logs["gan/weight"]) == pytest.approx(float(w), rel=1e-4)
    for n, p in t.trainable:
        assert torch.allclose(fast[n], p.grad, rtol=1e-4, atol=1e-7), n


def test_encoder_frozen_decoder_trains():
    t = make_trainer()
    enc_before = {k: v.clone() for k, v in t.vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    dec_before = decoder_state(t.vae)
    t.step(batch(0))
    after = t.vae.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in enc_before.items())
    assert any(not torch.equal(v, after[k]) for k, v in dec_before.items())


def test_nonfinite_step_skipped_then_stops():
    t = make_trainer(max_bad_steps=2)
    before = decoder_state(t.vae)
    ema_before = {k: v.clone() for k, v in t.ema.state_dict().items()}
    bad = batch(0)
    bad[0, 0, 0, 0] = float("nan")
    logs = t.step(bad)
    assert logs["train/skipped"] == 1.0 and t.skipped == 1
    assert all(torch.equal(v, decoder_state(t.vae)[k]) for k, v in before.items())
    assert all(torch.equal(v, t.ema.state_dict()[k]) for k, v in ema_before.items())
    with pytest.raises(NonFiniteError, match="non-finite"):
        t.step(bad)


def test_last_layer_bf16_changes_the_adaptive_weight_by_rounding_only():
    """``Tuning.last_layer_bf16`` under bf16 autocast: the weight-gradient conv runs in bf16 (the
    weight moves, so the lever is on) and the adaptive weight stays within bf16's rounding."""
    from furlib.training.speed import Tuning

    weights = []
    for bf16 in (False, True):
        t = Trainer(load_vae("tiny-random", seed=0), settings(mixed_precision="bf16"), "cpu",
                    LPIPS("vgg", "random", seed=0), tuning=Tuning(last_layer_bf16=bf16))
        x = batch(0)
        _, logs = t.decoder_grads(x, t.encode(x, step_generator(t.device, 0, 0, 0)), gan_on=True)
        weights.append(float(logs["gan/weight"]))
    assert weights[0] != weights[1] and weights[1] == pytest.approx(weights[0], rel=2e-3), weights  # seen: 2e-4


def test_resume_is_exact(tmp_path):
    kw = dict(gan_loss="wgan-gp")
    straight = make_trainer(**kw)
    for s in range(4):
        straight.step(batch(s))
    first = make_trainer(**kw)
    for s in range(2):
        first.step(batch(s))
    first.save(tmp_path / "checkpoints", base_model="tiny-random")
    resumed = make_trainer(**kw)
    resumed.load(checkpoint_pick.latest_checkpoint(tmp_path))
    assert resumed.step_count == 2
    for s in range(2, 4):
        resumed.step(batch(s))
    for name, ref in [("decoder", decoder_state(straight.vae)), ("ema", straight.ema.state_dict()),
                      ("critic", straight.critic.state_dict())]:
        got = {"decoder": decoder_state(resumed.vae), "ema": resumed.ema.state_dict(),
               "critic": resumed.critic.state_dict()}[name]
        for k, v in ref.items():
            assert torch.equal(v, got[k]), (name, k)


def test_schedules():
    # the author's later schedule, 1000x shorter: MAE cosine 1 -> 0.6, plain-mean MSE 0 -> 2
    s = settings(mae_weight=1.0, mae_weight_end=0.6, mse_weight=0.0, mse_weight_end=2.0, loss_schedule_steps=100,
                 warmup_steps=10, max_steps=100, lr_schedule="cosine")
    assert s.loss_weights(0) == pytest.approx((1.0, 0.0))
    assert s.loss_weights(50) == pytest.approx((0.8, 1.0))
    assert s.loss_weights(500) == pytest.approx((0.6, 2.0))
    assert s.lr_factor(0) == pytest.approx(0.1)
    assert s.lr_factor(50) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_bad_settings_named():
    with pytest.raises(ValueError, match="gan_loss"):
        settings(gan_loss="lsgan")
    with pytest.raises(ValueError, match="grad_accum"):
        settings(batch_size=3, grad_accum=2)
    with pytest.raises(ValueError, match="phase_upsample.*bare yes/no"):  # YAML's `no` is False
        settings(phase_upsample=False)


def test_short_run_lowers_held_out_error_of_ema():
    """Learning test: a short CPU run on a fixed image improves the EMA decoder on held-out crops."""
    torch.manual_seed(0)
    t = make_trainer(batch_size=4, lr=5e-3, ema_decay=0.8, gan_start=10_000, critic_start=10_000, lpips_weight=0.0)
    image = torch.linspace(-1, 1, 96).view(1, 1, 1, 96).expand(1, 3, 96, 96).clone()
    image[:, 0, 30:70, 20:60] = 0.8  # flat-colour shapes on a gradient
    image[:, 2, 50:90, 40:80] = -0.7
    train_crops = lambda s: torch.stack([image[0, :, y:y + RES, x:x + RES]  # noqa: E731
                                         for y, x in torch.randint(0, 96 - RES, (4, 2), generator=torch.Generator().manual_seed(s))])
    held_out = torch.stack([image[0, :, 60:60 + RES, 5:5 + RES], image[0, :, 3:3 + RES, 61:61 + RES]])
    base = t.reconstruct(held_out)
    for s in range(40):
        t.step(train_crops(s))
    errs = t.held_out_errors(held_out, base)
    assert errs["ema"] < 0.85 * errs["base"], errs  # seen: 0.094 vs 0.125


def test_phase_upsample_is_diffusers_upsample2d():
    """2x2 phase convs == nearest 2x + 3x3 conv, also as one transposed conv: outputs and all
    gradients, any size, both layouts."""
    from diffusers.models.upsampling import Upsample2D

    from furlib.training.speed import PhaseUpsample, use_phase_upsampling

    torch.manual_seed(0)
    up = Upsample2D(6, use_conv=True, out_channels=5)
    cases = ((2, 6, 5, 7), torch.contiguous_format), ((1, 6, 4, 4), torch.channels_last), ((1, 6, 1, 1), torch.contiguous_format)
    for (shape, layout), fast in itertools.product(cases, [PhaseUpsample(up.conv), PhaseUpsample(up.conv, True)]):
        x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_(True)
        ref, out = up(x), fast(x)
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(ref, [x, up.conv.weight, up.conv.bias], g),
                        torch.autograd.grad(out, [x, up.conv.weight, up.conv.bias], g)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)
    vae = load_vae("tiny-random", seed=0)
    keys = list(vae.state_dict())
    assert use_phase_upsampling(vae.decoder) == len(vae.config.block_out_channels) - 1
    assert list(vae.state_dict()) == keys  # checkpoints and exports are unchanged


def test_speed_knobs_change_nothing():
    """Speed/memory knobs must compute the same gradients as the plain path."""
    grads = []
    for kw in ({}, {"gradient_checkpointing": True, "channels_last": "yes", "phase_upsample": "yes"}):
        t = make_trainer(latent_mode="mode", **kw)
        x = batch(0)
        t.decoder_grads(x.contiguous(memory_format=t.layout), t.encode(x, step_generator(t.device, 0, 0, 0)),
                        gan_on=True, accum=1)
        grads.append({n: p.grad.clone() for n, p in t.trainable})
    # other conv algorithms reassociate sums: compare by norm over all tensors (per tensor it is
    # meaningless for the attention key bias, whose true gradient is zero: softmax ignores it)
    a, b = (torch.cat([g.flatten() for g in gs.values()]) for gs in grads)
    assert (a - b).norm() <= 1e-3 * a.norm()  # seen: 1.6e-4 (fp32, CPU)


def _cpp_compiler() -> str:
    """What torch.compile's CPU backend would call: $CXX, else g++ / clang++ / c++ on the PATH."""
    return next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c)), "")


@pytest.mark.skipif(not _cpp_compiler(), reason="needs a C++ compiler: torch.compile builds C++ kernels on the "
                    "CPU; install one (Debian/Ubuntu: apt install g++) or set CXX")
def test_compiled_fast_path_matches_plain():
    """02's GPU path (torch.compile of encoder, decoder, LPIPS and the critic's first-order passes,
    with forced NHWC layouts, plus phase upsampling) computes the plain path's losses and
    decoder and critic gradients. On CPU: the slowest test (about 2 minutes of compilation)."""
    results = []
    for kw in ({}, {"torch_compile": "yes", "phase_upsample": "yes"}):
        t = make_trainer(latent_mode="mode", **kw)
        x = batch(0)
        recon, logs = t.decoder_grads(x, t.encode(x, step_generator(t.device, 0, 0, 0)), gan_on=True, accum=1)
        logs.update(t.critic_grads(x, recon, step_generator(t.device, 0, 0, 1), accum=1))
        grads = [p.grad.flatten() for _, p in t.trainable] + [p.grad.flatten() for p in t.critic.parameters()]
        results.append((torch.cat(grads), logs))
    (plain, plain_logs), (fast, fast_logs) = results
    assert (fast - plain).norm() <= 1e-4 * plain.norm()  # seen: 1.4e-6 (fp32, CPU)
    for key in ("rec/total", "gan/weight", "critic/loss", "critic/gp"):
        assert float(fast_logs[key]) == pytest.approx(float(plain_logs[key]), rel=1e-4, abs=1e-6), key
