"""Mixed precision computes what fp32 computes: the gradients at the reconstruction (the
reconstruction and critic terms) and the critic's own gradients, fp16 and bf16 against fp32 on
the same inputs and weights (issue 12). fp16 without loss scaling underflows in these backward
passes; the tolerances below are what fp16's rounding of the forward leaves (seen values noted)."""

import pytest
import torch

from furlib.models import load_vae
from furlib.perceptual import LPIPS, use_fp16_trunk
from furlib.training.settings import TrainSettings
from furlib.training.trainer import Trainer, step_generator

RES = 64


def make(precision: str, lpips_weight: float = 1.0, trunk: str = "random") -> Trainer:
    torch.manual_seed(0)  # the same critic weights for every precision
    s = TrainSettings(batch_size=2, warmup_steps=0, mixed_precision=precision, critic_channels=8, critic_layers=2,
                      latent_mode="mode", lpips_weight=lpips_weight)
    return Trainer(load_vae("tiny", seed=0), s, "cpu", LPIPS("vgg", trunk, seed=0) if lpips_weight else None)


def images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, RES, RES, generator=g) * 2 - 1
    return x, (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def rel_err(got, ref) -> float:
    return float((got - ref).norm() / ref.norm())


def quiet_critic(t: Trainer) -> Trainer:
    """Scores 1000x flatter (as a critic whose input-gradients are small): the gradients through
    it are small enough to underflow in fp16, as they do at 256 px, batch 8 (1/(8*900) a score)."""
    with torch.no_grad():
        t.critic.net[-1].weight.mul_(1e-3)
    return t


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reconstruction_leaf_gradient_matches_fp32(precision):
    """Oklab terms and LPIPS (in fp32 under any autocast): the same d rec / d recon as fp32.
    Before: LPIPS ran under the autocast, unscaled: 6% error and 1% exact zeros in fp16."""
    x, recon = images()
    grads = [make(p).leaf_grads(recon.clone().requires_grad_(True), x, gan_on=False)[0][0]
             for p in ("no", precision)]
    assert rel_err(grads[1], grads[0]) < 1e-4  # seen: 0


def test_fp16_lpips_trunk_is_the_same_inside_the_steps_autocast():
    """``Tuning.lpips_fp16`` (which ``speed_up`` applies on compiled CUDA; here by hand), with the
    pretrained trunk (whose gradients overflow where a random one's do not): the step's
    reconstruction gradient with LPIPS's trunk in fp16 is the same whether the step runs in
    fp32 or bf16 (the trunk stays fp16 inside, on the loss scaled by ``backward_scale``) or in
    fp16 (on the step's own loss scale alone: both would overflow), and near the fp32 trunk's."""
    x, recon = images()
    ref = make("no", trunk="pretrained").leaf_grads(recon.clone().requires_grad_(True), x, gan_on=False)[0][0]
    grads = {}
    for precision in ("no", "bf16", "fp16"):
        t = make(precision, trunk="pretrained")
        use_fp16_trunk(t.rec_loss.lpips)
        if precision == "fp16":  # a loss scale grown to 2^24 (GradScaler doubles it every 2000 clean
            t.scaler.scale(torch.ones(()))  # steps): times the trunk's 2^11 too it overflows (seen: 2^30)
            t.scaler.update(2.0**24)
        grads[precision] = t.leaf_grads(recon.clone().requires_grad_(True), x, gan_on=False)[0][0]
    assert rel_err(grads["bf16"], grads["no"]) < 1e-5
    assert 1e-4 < rel_err(grads["no"], ref) < 0.15  # changed (fp16 did run), not by much
    assert rel_err(grads["fp16"], grads["bf16"]) < 1e-3
    for precision in ("bf16", "fp16"):
        assert not (grads[precision] == 0).any()


def test_fp16_critic_term_leaf_gradient_matches_fp32():
    """d gan / d recon runs on the decoder's scaled loss. Before (unscaled): 8.6% error and 5%
    exact zeros; scaled: 2.4% (fp16 rounding of the critic's forward), no zeros."""
    x, recon = images()
    grads = [quiet_critic(make(p, 0.0)).leaf_grads(recon.clone().requires_grad_(True), x, gan_on=True)[0][1]
             for p in ("no", "fp16")]
    assert rel_err(grads[1], grads[0]) < 0.04
    assert float((grads[1] == 0).float().mean()) < 1e-3


def test_fp16_critic_has_its_own_scaler_skips_overflow_and_matches_fp32():
    """The critic's backward (incl. the penalty's inner gradient) runs on its own scaler's scale:
    an overflow skips only the critic's step and halves only its scale; once the scale fits, its
    unscaled gradients are fp32's. Before (unscaled): 9% error; scaled: 0.3%."""
    x, recon = images()
    ref_t, t = quiet_critic(make("no", 0.0)), quiet_critic(make("fp16", 0.0))
    ref_t.critic_grads(x, recon, step_generator(ref_t.device, 0, 0, 1), accum=1)
    ref = torch.cat([p.grad.flatten() for p in ref_t.critic.parameters()])
    skips = 0
    for _ in range(12):
        before = [p.detach().clone() for p in t.critic.parameters()]
        scale = t.critic_scaler.get_scale()
        t.opt_critic.zero_grad(set_to_none=True)
        t.critic_grads(x, recon, step_generator(t.device, 0, 0, 1), accum=1)
        if t.apply_critic()["critic/skipped"] == 0.0:
            break
        skips += 1
        assert all(torch.equal(a, b) for a, b in zip(before, t.critic.parameters()))  # not stepped
        assert t.critic_scaler.get_scale() == scale / 2
    assert skips >= 1  # 65536 overflows at this size: the skip path ran
    assert t.scaler.get_scale() == 65536.0  # the decoder's scale is its own
    got = torch.cat([p.grad.flatten() for p in t.critic.parameters()])  # unscaled by apply_critic
    assert rel_err(got, ref) < 0.01


def test_fp16_decoder_overflow_skips_the_step_and_the_ema_and_halves_only_its_scale():
    """An overflowing fp16 step changes no weight and no EMA, is counted, and halves the decoder's
    scale (before, the EMA moved and the log said the step was not skipped)."""
    t = make("fp16", 0.0)
    x, _ = images()
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # overflows every fp16 backward
    before = {n: p.detach().clone() for n, p in t.trainable}
    with torch.no_grad():
        t.ema.shadow[0].add_(1.0)  # away from the weights, so an EMA step would show
    ema_before = [e.clone() for e in t.ema.shadow]
    logs = t.step(x)
    assert logs["train/skipped"] == 1.0 and t.skipped == 1
    assert all(torch.equal(before[n], p) for n, p in t.trainable)
    assert all(torch.equal(a, b) for a, b in zip(ema_before, t.ema.shadow))
    assert t.scaler.get_scale() == 2.0**119
