"""The training step of the Furception recipe, in one place: ``Trainer`` holds a run's decoder,
critic, optimizers, EMA and scalers, and ``Trainer.step(batch_m11)`` is one optimisation step.

One step on an ``rgb_m11`` NCHW batch, split into ``grad_accum`` micro-batches:

1. the frozen encoder gives latents (posterior sample or mode); the decoder reconstructs;
2. the reconstruction loss (Oklab L1/L2 + LPIPS) and the critic term are differentiated with
   respect to the *reconstruction* only (``leaf_grads``), then the adaptive weight comes from
   the last layer's weight gradients (``losses.last_layer_grads``), and the decoder runs one
   backward on ``d_rec + w * d_gan`` -- the same gradients as LDM's ``rec + w * gan``;
3. the critic's gradients on real vs. detached reconstructions;
4. gradients averaged over processes (``speed.average_gradients``); non-finite steps are skipped
   (no optimizer or EMA update) and counted; AdamW and the EMA update; the critic's AdamW step.

With ``grad_accum`` > 1 the weight is the whole step's, as on one batch (issue 26): each
micro-batch adds its last-layer gradients to the step's sums and keeps its latents and the two
gradients at its reconstruction (2 x its images in fp32, ``MicroBatch``); once all are in, the
weight comes from the sums, and each micro-batch's decoder backward runs on ``d_rec + w * d_gan``.
The last micro-batch keeps its graph for that; the others decode their latents again (one extra
decoder forward each, none with a graph in the first pass). With several processes the sums are
averaged over ranks first, so the weight is the global batch's, as the gradient is.

fp16: every backward that can underflow runs on a scaled loss. The reconstruction's leaf
gradients and the decoder's backward use the decoder's scaler; the critic's backward and its
penalty's inner gradient use the critic's own scaler, which skips the critic's step on overflow.
All randomness of a step (posterior noise, penalty interpolates) is drawn from generators
seeded by (seed, step, stream), so a resumed run repeats an uninterrupted one exactly.

Elsewhere: the settings (``furlib.training.settings``), the losses and the critic
(``furlib.training.losses``), what only makes it faster (``furlib.training.speed``), the loop
around the step (``furlib.training.fit``).
"""

import contextlib
import dataclasses
from pathlib import Path

import torch

from furlib import checkpoint
from furlib.models import decoder_state, split_trainable
from furlib.oklab import rgb_to_oklab
from furlib.training import speed
from furlib.training.ema import EMA
from furlib.training.losses import (PatchCritic, ReconstructionLoss, adaptive_weight, critic_loss,
                                    generator_loss, last_layer_grads)
from furlib.training.settings import PRECISIONS, TrainSettings


class NonFiniteError(RuntimeError):
    pass


def step_generator(device: torch.device, seed: int, step: int, stream: int) -> torch.Generator:
    """A generator for one purpose (``stream``) of one step: resumable randomness."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) * 16 + stream)
    return gen


class FeatureTap:
    """Keeps the input of the decoder's last conv (the features the adaptive weight needs).
    Detached (``detached``): the weight reads them without a graph, and a compiled decoder whose
    extra output required grad would be handed a zero gradient for it in every backward."""

    def __init__(self, conv: torch.nn.Conv2d, detached: bool = True):
        self.features, self.detached = None, detached
        self.handle = conv.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.features = inputs[0].detach() if self.detached else inputs[0]


def nonfinite_message(streak: int, step: int, batch: torch.Tensor) -> str:
    """Why the run stops: bad data when the batch itself is not finite, else the optimisation."""
    head = f"{streak} non-finite steps in a row at step {step}; the last checkpoint is intact: "
    if not bool(torch.isfinite(batch).all()):
        return head + ("the training batch itself holds NaN/inf values: the data is bad, not the "
                       "optimisation (check data/train and the loader, or re-run 01_data_prep)")
    return head + "lower lr or try mixed_precision='bf16'"


@dataclasses.dataclass
class MicroBatch:
    """What a micro-batch's decoder backward needs once the step's weight is known."""
    z: torch.Tensor             # its latents (decoded again when ``recon`` is None)
    leaf_grads: list            # [d rec / d recon, (d gan / d recon)], fp32, unscaled
    last_layer: list            # the same two at the decoder's last conv weight (empty without gan)
    recon: torch.Tensor | None  # the reconstruction with its graph (only the last micro-batch's)


def loss_scale(scaler: torch.amp.GradScaler, like: torch.Tensor):
    """The scaler's current scale as a 0-dim tensor on ``like``'s device (no host sync), or 1.0
    when it is disabled (not fp16)."""
    if not scaler.is_enabled():
        return 1.0
    return scaler.scale(torch.ones((), device=like.device))


class Trainer:
    """With ``world_size`` > 1 (an initialised ``torch.distributed`` group, e.g. from accelerate),
    each process steps its own batch and gradients are averaged before every update, so
    weights, EMA and critic stay identical on all ranks; ``batch_size`` is per process.
    ``tuning``: benchmark and test levers (``speed.Tuning``), not recipe parameters."""

    def __init__(self, vae, settings: TrainSettings, device: torch.device, lpips=None,
                 rank: int = 0, world_size: int = 1, tuning: speed.Tuning | None = None):
        self.rank, self.world_size = rank, world_size
        if settings.lpips_weight and lpips is None:
            raise ValueError("lpips_weight > 0 needs an LPIPS module (furlib.perceptual.LPIPS)")
        s, self.s, self.device = settings, settings, torch.device(device)
        self.tuning = tuning or speed.Tuning()
        self.vae = vae.to(self.device)
        self.trainable = split_trainable(self.vae)
        if s.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
        self.tap = FeatureTap(self.vae.decoder.conv_out, self.tuning.tap_detached)
        self.rec_loss = ReconstructionLoss(s.color_space, lpips.to(self.device) if lpips else None,
                                           self.tuning.lpips_autocast)
        with torch.random.fork_rng(devices=[]):  # the critic's start is the run's seed's, whatever the base
            torch.manual_seed(s.seed)
            self.critic = PatchCritic(s.critic_layers, s.critic_channels, s.critic_norm, s.critic_input)
        self.critic = self.critic.to(self.device)
        # critic_scores: the critic for first-order passes (maybe compiled); penalty: WGAN-GP's
        # (None: the plain one, on the eager critic)
        self.layout, self.critic_scores, self.penalty = speed.speed_up(self.vae, self.critic, self.rec_loss, s,
                                                                       self.device, self.tuning)
        self.opt, self.opt_critic = self._optimizers()
        self.ema = EMA(self.trainable, s.ema_decay_for(s.batch_size * world_size))
        # fp16 loss scalers, one for the decoder's backward passes and one for the critic's: each
        # model skips its own overflowing steps and keeps its own scale (disabled unless fp16)
        fp16 = s.mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.critic_scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.step_count, self.skipped, self.bad_streak = 0, 0, 0

    def _optimizers(self):
        """AdamW for the decoder and for the critic, the same betas and weight decay."""
        s, fused = self.s, self.device.type == "cuda"  # fused: one kernel on CUDA
        betas = (s.adam_beta1, s.adam_beta2)
        opt = torch.optim.AdamW([p for _, p in self.trainable], lr=s.lr, betas=betas,
                                weight_decay=s.weight_decay, fused=fused)
        opt_critic = torch.optim.AdamW(list(self.critic.parameters()), lr=s.critic_lr, betas=betas,
                                       weight_decay=s.weight_decay, fused=fused)
        return opt, opt_critic

    def step(self, batch_m11: torch.Tensor) -> dict:
        """One optimizer step on a CPU or device batch; returns logs (tensors and floats)."""
        s, step = self.s, self.step_count
        gan_on = step >= s.gan_start and s.disc_weight > 0
        critic_on = step >= s.critic_start
        self.set_lr(step)
        self.opt.zero_grad(set_to_none=True)
        self.opt_critic.zero_grad(set_to_none=True)
        logs = {}
        batch = batch_m11.to(self.device, non_blocking=True).contiguous(memory_format=self.layout)
        self._last_batch = batch  # checked only when a streak of non-finite steps stops the run
        micro, held, sums = batch.chunk(s.grad_accum), [], []
        for i, x in enumerate(micro):
            stream = 2 * (i + s.grad_accum * self.rank)  # own noise per micro-batch and rank
            with self.part("encode"):
                z = self.encode(x, step_generator(self.device, s.seed, step, stream))
            with self.part("decoder_grads"):
                part, recon, micro_logs = self.reconstruction_grads(x, z, gan_on, keep_graph=i == len(micro) - 1)
            sums = part.last_layer if not sums else [a + b for a, b in zip(sums, part.last_layer)]
            held.append(part)
            if critic_on:
                with self.part("critic_grads"):
                    gen = step_generator(self.device, s.seed, step, stream + 1)
                    micro_logs.update(self.critic_grads(x, recon, gen, s.grad_accum))
            for k, v in micro_logs.items():
                logs[k] = logs.get(k, 0.0) + v / s.grad_accum
        weight = None
        if gan_on:  # the step's weight, from the whole (global) batch's last-layer gradients
            speed.average_tensors(sums, self.world_size)
            weight = logs["gan/weight"] = adaptive_weight(*sums, s.disc_weight)
        with self.part("decoder_grads"), self.part("decoder backward"):
            for part in reversed(held):  # the last micro-batch's graph first: it is still alive
                self.decoder_backward(part, weight, s.grad_accum)
        params = [p for _, p in self.trainable] + list(self.critic.parameters())
        speed.average_gradients(params, [logs["rec/total"]], self.world_size)
        with self.part("apply"):
            logs.update(self.apply_decoder(logs["rec/total"]))
            if critic_on:
                logs.update(self.apply_critic())
        self.step_count += 1
        return logs

    @torch.no_grad()
    def encode(self, x_m11: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Latents from the frozen encoder, in fp32."""
        with self.autocast():
            post = self.vae.encode(x_m11).latent_dist
        mean = post.mean.float()
        if self.s.latent_mode == "mode":
            return mean
        noise = torch.randn(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype)
        return mean + post.std.float() * noise

    def leaf_grads(self, leaf: torch.Tensor, x_m11: torch.Tensor, gan_on: bool) -> tuple[list, dict]:
        """[d rec / d leaf, (d gan / d leaf)] at the fp32 reconstruction ``leaf``, unscaled fp32, and
        logs. In fp16 both backward passes run on the decoder's scaled loss (they underflow without);
        in other precisions the reconstruction's runs on a loss scaled for LPIPS's fp16 trunk, if any
        (``ReconstructionLoss.backward_scale``)."""
        s = self.s
        scale = loss_scale(self.scaler, leaf)
        # LPIPS's fp16 trunk needs a scaled loss too (``HalfTrunk``): fp16 steps' scale serves it
        rec_scale = scale if self.scaler.is_enabled() else self.rec_loss.backward_scale(leaf)
        mae_w, mse_w = s.loss_weights(self.step_count)
        with self.part("rec-loss grads"):
            with self.autocast():
                rec, logs = self.rec_loss(leaf, x_m11, mae_w, mse_w, s.lpips_weight)
            grads = [torch.autograd.grad(rec * rec_scale, leaf)[0] / rec_scale]
        if gan_on:
            with self.part("critic-term grads"):
                with self.autocast():
                    gan = generator_loss(self.critic_scores(self.critic.prepare(leaf)), s.gan_loss)
                grads.append(torch.autograd.grad(gan * scale, leaf)[0] / scale)
            logs["gan/generator"] = gan.detach()
        return grads, logs

    def reconstruction_grads(self, x_m11, z, gan_on: bool, keep_graph: bool) -> tuple[MicroBatch, torch.Tensor, dict]:
        """Decode ``z`` (with a graph only if ``keep_graph``) and take both terms' gradients at the
        reconstruction and at the last layer; returns them, the detached reconstruction and logs."""
        with torch.set_grad_enabled(keep_graph), self.autocast(), self.part("decoder forward"):
            recon = self.vae.decode(z).sample
        leaf = recon.detach().float().requires_grad_(True)
        grads, logs = self.leaf_grads(leaf, x_m11, gan_on)
        last = []
        if gan_on:
            with torch.no_grad(), self.part("last-layer grads"):
                bf16 = self.tuning.last_layer_bf16 and self.s.mixed_precision == "bf16"
                last = last_layer_grads(self.tap.features, grads, self.vae.decoder.conv_out,
                                        torch.bfloat16 if bf16 else torch.float32)
        self.tap.features = None  # free the activation
        return MicroBatch(z, grads, last, recon if keep_graph else None), recon.detach(), logs

    def decoder_backward(self, part: MicroBatch, weight, accum: int) -> None:
        """The decoder's backward of (d rec + weight * d gan) / accum for one micro-batch; one whose
        graph was not kept is decoded again first (the same latents, the same output)."""
        recon = part.recon
        if recon is None:
            with self.autocast(), self.part("decoder forward again"):
                recon = self.vae.decode(part.z).sample
            self.tap.features = None
        grad = part.leaf_grads[0] if weight is None else part.leaf_grads[0] + weight * part.leaf_grads[1]
        recon.backward(self.scaler.scale(grad / accum).to(recon.dtype))  # scale() is a no-op unless fp16
        part.recon = None  # frees the graph

    def decoder_grads(self, x_m11, z, gan_on: bool, accum: int = 1) -> tuple[torch.Tensor, dict]:
        """One micro-batch's whole decoder gradient, rec + w * gan with its own w: the step at
        ``grad_accum`` 1, for tests and benchmarks of that path. Returns the reconstruction and logs."""
        part, recon, logs = self.reconstruction_grads(x_m11, z, gan_on, keep_graph=True)
        weight = None
        if gan_on:
            weight = logs["gan/weight"] = adaptive_weight(*part.last_layer, self.s.disc_weight)
        self.decoder_backward(part, weight, accum)
        return recon, logs

    def critic_grads(self, x_m11, recon_m11, gen, accum: int) -> dict:
        """The critic's (scaled, in fp16) gradients on reals vs. the detached reconstruction."""
        s = self.s
        scale = loss_scale(self.critic_scaler, x_m11)
        with self.autocast():
            real, fake = self.critic.prepare(x_m11), self.critic.prepare(recon_m11.float())
            loss, logs = critic_loss(self.critic, real, fake, s.gan_loss, s.gp_weight, s.r1_gamma, s.drift_weight,
                                     generator=gen, scores=self.critic_scores, grad_scale=scale, penalty=self.penalty)
        (loss * scale / accum).backward()  # a non-finite loss shows in the synced grads: the step is skipped
        return logs

    def apply_decoder(self, rec_total) -> dict:
        """Clip, then AdamW and EMA, or skip a non-finite step: no update, no EMA step, counted. In
        fp16 an overflow is such a step too; ``scaler.update()`` then halves the decoder's scale."""
        params = [p for _, p in self.trainable]
        self.scaler.unscale_(self.opt)  # no-op unless fp16
        max_norm = self.s.grad_clip if self.s.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not torch.isfinite(rec_total) or not torch.isfinite(norm):
            self.skipped += 1
            self.bad_streak += 1
            self.opt.zero_grad(set_to_none=True)
            self.scaler.update()
            if self.bad_streak >= self.s.max_bad_steps:
                raise NonFiniteError(nonfinite_message(self.bad_streak, self.step_count, self._last_batch))
            return {"train/skipped": 1.0, "train/grad_norm": norm}
        self.bad_streak = 0
        self.scaler.step(self.opt)
        self.scaler.update()
        self.ema.update()
        return {"train/skipped": 0.0, "train/grad_norm": norm}

    def apply_critic(self) -> dict:
        """The critic's AdamW step, skipped when its gradients are not finite (fp16: its own scaler
        skips and lowers its scale)."""
        self.critic_scaler.unscale_(self.opt_critic)  # no-op unless fp16
        norm = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), float("inf"))
        finite = bool(torch.isfinite(norm))
        if self.critic_scaler.is_enabled():
            self.critic_scaler.step(self.opt_critic)  # skips on inf/NaN itself
            self.critic_scaler.update()
        elif finite:
            self.opt_critic.step()
        return {"critic/skipped": 0.0 if finite else 1.0}

    def set_lr(self, step: int) -> None:
        """``TrainSettings.lr_factor``: the decoder warms up; the critic starts at its full rate, as
        in the author's code (its optimizer there has a constant rate)."""
        for g in self.opt.param_groups:
            g["lr"] = self.s.lr * self.s.lr_factor(step)
        for g in self.opt_critic.param_groups:
            g["lr"] = self.s.critic_lr * self.s.lr_factor(step, warmup=False)

    def autocast(self):
        dtype = PRECISIONS[self.s.mixed_precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def part(self, name: str):
        """The context a named part of the step runs in: ``tuning.part_timer``'s, else nothing."""
        timer = self.tuning.part_timer
        return timer(name) if timer else contextlib.nullcontext()

    def check_in_sync(self) -> None:
        """All ranks must hold identical decoder, EMA and critic weights (a collective call)."""
        tensors = [p for _, p in self.trainable] + self.ema.shadow + list(self.critic.parameters())
        speed.check_in_sync(tensors, self.rank, self.world_size, self.step_count)

    @torch.no_grad()
    def reconstruct(self, x_m11: torch.Tensor, ema: bool = False) -> torch.Tensor:
        """Deterministic (posterior mode) reconstruction with the current or the EMA weights."""
        with self.ema.swapped_in() if ema else contextlib.nullcontext(), self.autocast():
            x = x_m11.to(self.device)
            recon = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample
        self.tap.features = None
        return recon.float().clamp(-1, 1).cpu()

    def held_out_errors(self, x_m11: torch.Tensor, base_recon: torch.Tensor) -> dict:
        """Mean Oklab L1 to the originals: base decoder, current weights, EMA weights."""
        err = lambda r: float((rgb_to_oklab(r) - rgb_to_oklab(x_m11.cpu())).abs().mean())  # noqa: E731
        return {"base": err(base_recon), "current": err(self.reconstruct(x_m11)),
                "ema": err(self.reconstruct(x_m11, ema=True))}

    def save(self, ckpt_root: Path, keep: int = 3, **extra) -> Path:
        opt_t, opt_meta = checkpoint.optimizer_tensors(self.opt)
        copt_t, copt_meta = checkpoint.optimizer_tensors(self.opt_critic)
        tensors = {"decoder": decoder_state(self.vae), "ema": self.ema.state_dict(),
                   "critic": self.critic.state_dict(), "optim_decoder": opt_t, "optim_critic": copt_t}
        state = dict(extra, skipped=self.skipped, optim_decoder=opt_meta, optim_critic=copt_meta,
                     scaler=self.scaler.state_dict(), critic_scaler=self.critic_scaler.state_dict(),
                     settings=dataclasses.asdict(self.s),
                     processes=self.world_size, cpu_threads=torch.get_num_threads())  # compared on resume
        return checkpoint.save_checkpoint(ckpt_root, self.step_count, tensors, state, keep)

    def load(self, ckpt_dir: Path) -> None:
        """Strict: every tensor and optimizer slot must be there (checkpoint.restore names the gap)."""
        state = checkpoint.restore(ckpt_dir, self.vae, self.ema, self.critic, self.opt, self.opt_critic, self.scaler)
        self.step_count, self.skipped = state["step"], state.get("skipped", 0)
        if state.get("critic_scaler"):  # fp16: the critic's own loss scale resumes where it was
            self.critic_scaler.load_state_dict(state["critic_scaler"])
