"""The training step of the Furception recipe: ``train_step(trainer, batch_m11)``.

One optimisation step on an ``rgb_m11`` NCHW batch, split into ``grad_accum`` micro-batches:

1. the frozen encoder gives latents (posterior sample or mode); the decoder reconstructs;
2. the reconstruction loss (Oklab L1/L2 + LPIPS) and the critic term are differentiated with
   respect to the *reconstruction* only (``leaf_grads``), then the adaptive weight comes from
   the last layer's weight gradients (``losses.last_layer_grads``), and the decoder runs one
   backward on ``d_rec + w * d_gan`` -- the same gradients as LDM's ``rec + w * gan``;
3. the critic's gradients on real vs. detached reconstructions;
4. gradients averaged over processes (``grad_sync``); non-finite steps are skipped (no
   optimizer or EMA update) and counted; AdamW and the EMA update; the critic's AdamW step.

With ``grad_accum`` > 1 the weight is the whole step's, as on one batch (issue 26): each
micro-batch adds its last-layer gradients to the step's sums and keeps its latents and the two
gradients at its reconstruction (2 x its images in fp32); once all are in, the weight comes from
the sums, and each micro-batch's decoder backward runs on ``d_rec + w * d_gan``. The last
micro-batch keeps its graph for that; the others decode their latents again (one extra decoder
forward each, no graph in the first pass). With several processes the sums are averaged over
ranks first, so the weight is the global batch's. The step's gradient equals one batch's.

fp16: every backward that can underflow runs on a scaled loss. The reconstruction's leaf
gradients and the decoder's backward use the decoder's scaler; the critic's backward and its
penalty's inner gradient use the critic's own scaler, which skips the critic's step on overflow.
All randomness of a step (posterior noise, penalty interpolates) is drawn from generators
seeded by (seed, step, stream), so a resumed run repeats an uninterrupted one exactly.
"""

import dataclasses

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
    micro, held, sums = batch.chunk(s.grad_accum), [], []
    for i, x in enumerate(micro):
        stream = 2 * (i + s.grad_accum * t.rank)  # own noise per micro-batch and rank
        with t.part("encode"):
            z = encode(t, x, step_generator(t.device, s.seed, step, stream))
        with t.part("decoder_grads"):
            part, recon, micro_logs = reconstruction_grads(t, x, z, gan_on, keep_graph=i == len(micro) - 1)
        sums = part.last_layer if not sums else [a + b for a, b in zip(sums, part.last_layer)]
        held.append(part)
        if critic_on:
            with t.part("critic_grads"):
                gen = step_generator(t.device, s.seed, step, stream + 1)
                micro_logs.update(critic_grads(t, x, recon, gen, s.grad_accum))
        for k, v in micro_logs.items():
            logs[k] = logs.get(k, 0.0) + v / s.grad_accum
    weight = None
    if gan_on:  # the step's weight, from the whole (global) batch's last-layer gradients
        grad_sync.average_tensors(sums, t.world_size)
        weight = logs["gan/weight"] = adaptive_weight(*sums, s.disc_weight)
    with t.part("decoder_grads"):
        for part in reversed(held):  # the last micro-batch's graph first: it is still alive
            decoder_backward(t, part, weight, s.grad_accum)
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


@dataclasses.dataclass
class MicroBatch:
    """What a micro-batch's decoder backward needs once the step's weight is known."""
    z: torch.Tensor            # its latents (decoded again when ``recon`` is None)
    leaf_grads: list           # [d rec / d recon, (d gan / d recon)], fp32, unscaled
    last_layer: list           # the same two, at the decoder's last conv weight
    recon: torch.Tensor | None  # the reconstruction with its graph (only the last micro-batch's)


def reconstruction_grads(t, x_m11, z, gan_on: bool, keep_graph: bool) -> tuple[MicroBatch, torch.Tensor, dict]:
    """Decode ``z`` (with a graph only if ``keep_graph``), take both terms' gradients at the
    reconstruction and at the last layer; returns them, the detached reconstruction and logs."""
    with torch.set_grad_enabled(keep_graph), t.autocast(), t.part("decoder forward"):
        recon = t.vae.decode(z).sample
    leaf = recon.detach().float().requires_grad_(True)
    grads, logs = leaf_grads(t, leaf, x_m11, gan_on)
    last = []
    if gan_on:
        with torch.no_grad():
            last = last_layer_grads(t.tap.features, grads, t.vae.decoder.conv_out)
    t.tap.features = None  # free the activation
    return MicroBatch(z, grads, last, recon if keep_graph else None), recon.detach(), logs


def decoder_backward(t, part: MicroBatch, weight, accum: int) -> None:
    """The decoder's backward of ``d rec + weight * d gan`` / accum for one micro-batch; one
    whose graph was not kept is decoded again first (the same latents, the same output)."""
    recon = part.recon
    if recon is None:
        with t.autocast(), t.part("decoder forward again"):
            recon = t.vae.decode(part.z).sample
        t.tap.features = None
    grad = part.leaf_grads[0] if weight is None else part.leaf_grads[0] + weight * part.leaf_grads[1]
    recon.backward(t.scaler.scale(grad / accum).to(recon.dtype))  # scale() is a no-op unless fp16
    part.recon = None  # free the graph's reference


def decoder_grads(t, x_m11, z, gan_on: bool, accum: int = 1) -> tuple[torch.Tensor, dict]:
    """One batch's whole decoder gradient (rec + w * gan, w its own): the step for
    ``grad_accum`` 1, for tests and benchmarks of that path. Returns the reconstruction and logs."""
    part, recon, logs = reconstruction_grads(t, x_m11, z, gan_on, keep_graph=True)
    weight = None
    if gan_on:
        weight = logs["gan/weight"] = adaptive_weight(*part.last_layer, t.s.disc_weight)
    decoder_backward(t, part, weight, accum)
    return recon, logs


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
