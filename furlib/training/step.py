"""The training step of the Furception recipe: ``train_step(trainer, batch_m11)``.

One optimisation step on an ``rgb_m11`` NCHW batch, split into ``grad_accum`` micro-batches:

1. the frozen encoder gives latents (posterior sample or mode); the decoder reconstructs;
2. the reconstruction loss (Oklab L1/L2 + LPIPS) and the critic term are differentiated with
   respect to the *reconstruction* only (``leaf_grads``), then the adaptive weight comes from
   the last layer's weight gradients (``losses.last_layer_grads``), and the decoder runs one
   backward on ``d_rec + w * d_gan`` -- the same gradients as LDM's ``rec + w * gan``. With
   ``grad_accum`` > 1 the weight is computed per micro-batch (each micro-batch's critic term is
   set to half its own reconstruction term; the step's weight logged is their mean);
3. the critic's gradients on real vs. detached reconstructions;
4. gradients averaged over processes (``grad_sync``); non-finite steps are skipped (no
   optimizer or EMA update) and counted; AdamW and the EMA update; the critic's AdamW step.

fp16: every backward that can underflow runs on a scaled loss. The reconstruction's leaf
gradients and the decoder's backward use the decoder's scaler; the critic's backward and its
penalty's inner gradient use the critic's own scaler, which skips the critic's step on overflow.
All randomness of a step (posterior noise, penalty interpolates) is drawn from generators
seeded by (seed, step, stream), so a resumed run repeats an uninterrupted one exactly.
"""

import torch

from furlib.training import grad_sync
from furlib.training.critic import critic_loss, generator_loss
from furlib.training.losses import adaptive_weight, last_layer_grads


class NonFiniteError(RuntimeError):
    pass


def step_generator(device: torch.device, seed: int, step: int, stream: int) -> torch.Generator:
    """A generator for one purpose (``stream``) of one step: resumable randomness."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) * 16 + stream)
    return gen


class FeatureTap:
    """Keeps the input of the decoder's last conv (the features the adaptive weight needs)."""

    def __init__(self, conv: torch.nn.Conv2d):
        self.features = None
        self.handle = conv.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.features = inputs[0]


def nonfinite_message(streak: int, step: int, batch: torch.Tensor) -> str:
    """Why the run stops: bad data when the batch itself is not finite, else the optimisation."""
    head = f"{streak} non-finite steps in a row at step {step}; the last checkpoint is intact: "
    if not bool(torch.isfinite(batch).all()):
        return head + ("the training batch itself holds NaN/inf values: the data is bad, not the "
                       "optimisation (check data/train and the loader, or re-run 01_data_prep)")
    return head + "lower lr or try mixed_precision='bf16'"


def train_step(t, batch_m11: torch.Tensor) -> dict:
    """One optimizer step of Trainer ``t``; returns logs (tensors and floats)."""
    s, step = t.s, t.step_count
    gan_on = step >= s.gan_start and s.disc_weight > 0
    critic_on = step >= s.critic_start
    set_lr(t, step)
    t.opt.zero_grad(set_to_none=True)
    t.opt_critic.zero_grad(set_to_none=True)
    logs = {}
    batch = batch_m11.to(t.device, non_blocking=True).contiguous(memory_format=t.layout)
    t._last_batch = batch  # checked only when a streak of non-finite steps stops the run
    for i, x in enumerate(batch.chunk(s.grad_accum)):
        stream = 2 * (i + s.grad_accum * t.rank)  # own noise per micro-batch and rank
        with t.part("encode"):
            z = encode(t, x, step_generator(t.device, s.seed, step, stream))
        with t.part("decoder_grads"):
            recon, micro_logs = decoder_grads(t, x, z, gan_on, s.grad_accum)
        if critic_on:
            with t.part("critic_grads"):
                gen = step_generator(t.device, s.seed, step, stream + 1)
                micro_logs.update(critic_grads(t, x, recon, gen, s.grad_accum))
        for k, v in micro_logs.items():
            logs[k] = logs.get(k, 0.0) + v / s.grad_accum
    params = [p for _, p in t.trainable] + list(t.critic.parameters())
    grad_sync.average_gradients(params, [logs["rec/total"]], t.world_size)
    with t.part("apply"):
        logs.update(apply_decoder(t, logs["rec/total"]))
        if critic_on:
            logs.update(apply_critic(t))
    t.step_count += 1
    return logs


@torch.no_grad()
def encode(t, x_m11: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Latents from the frozen encoder, in fp32."""
    with t.autocast():
        post = t.vae.encode(x_m11).latent_dist
    mean = post.mean.float()
    if t.s.latent_mode == "mode":
        return mean
    noise = torch.randn(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype)
    return mean + post.std.float() * noise


def loss_scale(scaler: torch.amp.GradScaler, like: torch.Tensor):
    """The scaler's current scale as a 0-dim tensor on ``like``'s device (no host sync), or 1.0
    when it is disabled (not fp16)."""
    if not scaler.is_enabled():
        return 1.0
    return scaler.scale(torch.ones((), device=like.device))


def leaf_grads(t, leaf: torch.Tensor, x_m11: torch.Tensor, gan_on: bool) -> tuple[list, dict]:
    """[d rec / d leaf, (d gan / d leaf)] at the fp32 reconstruction ``leaf``, unscaled fp32, and
    logs. In fp16 both backward passes run on the decoder's scaled loss (they underflow without)."""
    s = t.s
    scale = loss_scale(t.scaler, leaf)
    mae_w, mse_w = s.loss_weights(t.step_count)
    with t.autocast():
        rec, logs = t.rec_loss(leaf, x_m11, mae_w, mse_w, s.lpips_weight)
    grads = [torch.autograd.grad(rec * scale, leaf)[0] / scale]
    if gan_on:
        with t.autocast():
            gan = generator_loss(t.critic_scores(t.critic.prepare(leaf)), s.gan_loss)
        grads.append(torch.autograd.grad(gan * scale, leaf)[0] / scale)
        logs["gan/generator"] = gan.detach()
    return grads, logs


def decoder_grads(t, x_m11, z, gan_on: bool, accum: int) -> tuple[torch.Tensor, dict]:
    """Backward of rec + w * gan into the decoder; returns the reconstruction and logs."""
    with t.autocast(), t.part("decoder forward"):
        recon = t.vae.decode(z).sample
    leaf = recon.detach().float().requires_grad_(True)
    grads, logs = leaf_grads(t, leaf, x_m11, gan_on)
    grad = grads[0]
    if gan_on:
        conv = t.vae.decoder.conv_out
        w = adaptive_weight(*last_layer_grads(t.tap.features, grads, conv), t.s.disc_weight)
        grad = grad + w * grads[1]
        logs["gan/weight"] = w
    recon.backward(t.scaler.scale(grad / accum).to(recon.dtype))  # scale() is a no-op unless fp16
    t.tap.features = None  # free the activation
    return recon.detach(), logs


def critic_grads(t, x_m11, recon_m11, gen, accum: int) -> dict:
    """The critic's (scaled, in fp16) gradients on reals vs. the detached reconstruction."""
    s = t.s
    scale = loss_scale(t.critic_scaler, x_m11)
    with t.autocast():
        real, fake = t.critic.prepare(x_m11), t.critic.prepare(recon_m11.float())
        loss, logs = critic_loss(t.critic, real, fake, s.gan_loss, s.gp_weight, s.r1_gamma,
                                 s.drift_weight, generator=gen, scores=t.critic_scores, grad_scale=scale)
    (loss * scale / accum).backward()  # a non-finite loss shows in the synced grads: the step is skipped
    return logs


def apply_decoder(t, rec_total) -> dict:
    """Clip, then AdamW and EMA, or skip a non-finite step: no update, no EMA step, counted. In
    fp16 an overflow is such a step too; ``scaler.update()`` then halves the decoder's scale."""
    params = [p for _, p in t.trainable]
    t.scaler.unscale_(t.opt)  # no-op unless fp16
    max_norm = t.s.grad_clip if t.s.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not torch.isfinite(rec_total) or not torch.isfinite(norm):
        t.skipped += 1
        t.bad_streak += 1
        t.opt.zero_grad(set_to_none=True)
        t.scaler.update()
        if t.bad_streak >= t.s.max_bad_steps:
            raise NonFiniteError(nonfinite_message(t.bad_streak, t.step_count, t._last_batch))
        return {"train/skipped": 1.0, "train/grad_norm": norm}
    t.bad_streak = 0
    t.scaler.step(t.opt)
    t.scaler.update()
    t.ema.update()
    return {"train/skipped": 0.0, "train/grad_norm": norm}


def apply_critic(t) -> dict:
    """The critic's AdamW step, skipped when its gradients are not finite (fp16: its own scaler
    skips and lowers its scale)."""
    t.critic_scaler.unscale_(t.opt_critic)  # no-op unless fp16
    norm = torch.nn.utils.clip_grad_norm_(t.critic.parameters(), float("inf"))
    finite = bool(torch.isfinite(norm))
    if t.critic_scaler.is_enabled():
        t.critic_scaler.step(t.opt_critic)  # skips on inf/NaN itself
        t.critic_scaler.update()
    elif finite:
        t.opt_critic.step()
    return {"critic/skipped": 0.0 if finite else 1.0}


def set_lr(t, step: int) -> None:
    """``TrainSettings.lr_factor``: the decoder warms up; the critic starts at its full rate, as
    in the author's code (its optimizer there has a constant rate)."""
    for g in t.opt.param_groups:
        g["lr"] = t.s.lr * t.s.lr_factor(step)
    for g in t.opt_critic.param_groups:
        g["lr"] = t.s.critic_lr * t.s.lr_factor(step, warmup=False)
