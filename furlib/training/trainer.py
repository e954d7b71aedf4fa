"""``Trainer``: the decoder, critic, optimizers, EMA and scaler of one run, stepped and saved.

See ``furlib.training.settings`` for the recipe and the order of a step.
"""

import contextlib
import dataclasses
from pathlib import Path

import torch

from furlib.training import checkpoint as ckpt_lib
from furlib.training.critic import PatchCritic, critic_loss, generator_loss
from furlib.training.ema import EMA
from furlib.training.losses import ReconstructionLoss, adaptive_weight, last_layer_grads
from furlib.models import decoder_state, split_trainable
from furlib.oklab import rgb_to_oklab
from furlib.training.settings import PRECISIONS, FeatureTap, TrainSettings, step_generator
from furlib.training.upsample import use_phase_upsampling


# Inductor's NHWC conversion, forced: left to its heuristic, the backward graph mixes layouts and
# cuDNN's convolution_backward copies ~0.5 GB activations to match them (~40 ms a step at 256 px,
# batch 32 on an H100); forced on an NCHW model: 273 -> 231 ms (benchmarks/RESULTS.md).
COMPILE_OPTIONS = {"force_layout_optimization": True}


class NonFiniteError(RuntimeError):
    pass


def nonfinite_message(streak: int, step: int, batch: torch.Tensor) -> str:
    """Why the run stops: bad data when the batch itself is not finite, else the optimisation."""
    head = f"{streak} non-finite steps in a row at step {step}; the last checkpoint is intact: "
    if not bool(torch.isfinite(batch).all()):
        return head + ("the training batch itself holds NaN/inf values: the data is bad, not the "
                       "optimisation (check data/train and the loader, or re-run 01_data_prep)")
    return head + "lower lr or try mixed_precision='bf16'"


class Trainer:
    """With ``world_size`` > 1 (an initialised ``torch.distributed`` group, e.g. from accelerate),
    each process steps its own batch and gradients are averaged before every update, so
    weights, EMA and critic stay identical on all ranks; ``batch_size`` is per process."""

    def __init__(self, vae, settings: TrainSettings, device: torch.device, lpips=None,
                 rank: int = 0, world_size: int = 1):
        settings.validate()
        self.rank, self.world_size = rank, world_size
        if settings.lpips_weight and lpips is None:
            raise ValueError("lpips_weight > 0 needs an LPIPS module (furlib.perceptual.LPIPS)")
        s, self.s, self.device = settings, settings, torch.device(device)
        self.vae = vae.to(self.device)
        self.trainable = split_trainable(self.vae)
        if s.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
        self.tap = FeatureTap(self.vae.decoder.conv_out)
        self.rec_loss = ReconstructionLoss(s.color_space, lpips.to(self.device) if lpips else None)
        self.critic = PatchCritic(s.critic_layers, s.critic_channels, s.critic_norm, s.critic_input).to(self.device)
        self._speed_up()
        fused = self.device.type == "cuda"
        betas = (s.adam_beta1, s.adam_beta2)
        self.opt = torch.optim.AdamW([p for _, p in self.trainable], lr=s.lr, betas=betas,
                                     weight_decay=s.weight_decay, fused=fused)
        self.opt_critic = torch.optim.AdamW(self.critic.parameters(), lr=s.critic_lr, betas=betas,
                                            weight_decay=s.weight_decay, fused=fused)
        self.ema = EMA(self.trainable, s.ema_decay_for(s.batch_size * world_size))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=s.mixed_precision == "fp16")
        self.step_count, self.skipped, self.bad_streak = 0, 0, 0

    def _speed_up(self) -> None:
        """Layout, phase upsampling and compilation: none changes what is computed (tests compare)."""
        s, compiled = self.s, self.s.uses("torch_compile", self.device)
        if s.uses("phase_upsample", self.device):
            use_phase_upsampling(self.vae.decoder)  # keeps the state-dict keys
        # compiled graphs choose their own layouts (see COMPILE_OPTIONS): "auto" NHWC is for eager
        nhwc = s.channels_last == "yes" or (s.channels_last == "auto" and not compiled and self.device.type == "cuda")
        self.layout = torch.channels_last if nhwc else torch.contiguous_format
        for module in (self.vae, self.critic, self.rec_loss):
            module.to(memory_format=self.layout)
        self.critic_scores = self.critic  # the critic for first-order passes (all but the penalty)
        if compiled:
            # in place, so state-dict keys and the feature hook stay
            for module in (self.vae.encoder, self.vae.decoder, self.rec_loss.lpips):
                if module is not None:
                    module.compile(options=COMPILE_OPTIONS)
            # a compiled twin sharing the weights: the penalty's double backward runs the eager
            # critic, because compiled graphs have no double backward
            self.critic_scores = torch.compile(self.critic, options=COMPILE_OPTIONS)

    def autocast(self):
        dtype = PRECISIONS[self.s.mixed_precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

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

    def decoder_grads(self, x_m11, z, gan_on: bool, accum: int) -> tuple[torch.Tensor, dict]:
        """Backward of rec + w * gan into the decoder; returns the reconstruction and logs."""
        s = self.s
        with self.autocast():
            recon = self.vae.decode(z).sample
        leaf = recon.detach().float().requires_grad_(True)
        mae_w, mse_w = s.loss_weights(self.step_count)
        with self.autocast():
            rec, logs = self.rec_loss(leaf, x_m11, mae_w, mse_w, s.lpips_weight)
        (grad,) = torch.autograd.grad(rec, leaf)
        if gan_on:
            with self.autocast():
                gan = generator_loss(self.critic_scores(self.critic.prepare(leaf)), s.gan_loss)
            (gan_grad,) = torch.autograd.grad(gan, leaf)
            conv, feats = self.vae.decoder.conv_out, self.tap.features
            w = adaptive_weight(*last_layer_grads(feats, [grad, gan_grad], conv), s.disc_weight)
            grad = grad + w * gan_grad
            logs.update({"gan/generator": gan.detach(), "gan/weight": w})
        recon.backward(self.scaler.scale(grad / accum).to(recon.dtype))  # scale() is a no-op unless fp16
        self.tap.features = None  # free the activation
        return recon.detach(), logs

    def critic_grads(self, x_m11, recon_m11, gen, accum: int) -> dict:
        s = self.s
        with self.autocast():
            real, fake = self.critic.prepare(x_m11), self.critic.prepare(recon_m11.float())
            loss, logs = critic_loss(self.critic, real, fake, s.gan_loss, s.gp_weight, s.r1_gamma,
                                     s.drift_weight, generator=gen, scores=self.critic_scores)
        (loss / accum).backward()  # a non-finite loss shows in the synced grads: the step is skipped
        return logs

    def step(self, batch_m11: torch.Tensor) -> dict:
        """One optimizer step on a CPU or device batch; returns logs (tensors and floats)."""
        s, step = self.s, self.step_count
        gan_on = step >= s.gan_start and s.disc_weight > 0
        critic_on = step >= s.critic_start
        self._set_lr(step)
        self.opt.zero_grad(set_to_none=True)
        self.opt_critic.zero_grad(set_to_none=True)
        logs = {}
        batch = batch_m11.to(self.device, non_blocking=True).contiguous(memory_format=self.layout)
        self._last_batch = batch  # checked only when a streak of non-finite steps stops the run
        for i, x in enumerate(batch.chunk(s.grad_accum)):
            stream = 2 * (i + s.grad_accum * self.rank)  # own noise per micro-batch and rank
            z = self.encode(x, step_generator(self.device, s.seed, step, stream))
            recon, rec_logs = self.decoder_grads(x, z, gan_on, s.grad_accum)
            if critic_on:
                rec_logs.update(self.critic_grads(x, recon, step_generator(self.device, s.seed, step, stream + 1),
                                                  s.grad_accum))
            for k, v in rec_logs.items():
                logs[k] = logs.get(k, 0.0) + v / s.grad_accum
        self._sync([p for _, p in self.trainable] + list(self.critic.parameters()), logs["rec/total"])
        logs.update(self._apply_decoder(logs["rec/total"]))
        if critic_on:
            critic_norm = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), float("inf"))
            if torch.isfinite(critic_norm):
                self.opt_critic.step()
            logs["critic/skipped"] = 0.0 if torch.isfinite(critic_norm) else 1.0
        self.step_count += 1
        return logs

    def _sync(self, params: list, rec_total: torch.Tensor) -> None:
        """Average gradients and the loss over ranks in one flat all-reduce (no-op on one process),
        so every rank takes the same skip-or-step decision."""
        if self.world_size == 1:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in params if p.grad is not None] + [rec_total.view(1)]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    def check_in_sync(self) -> None:
        """All ranks must hold identical decoder, EMA and critic weights (a collective call)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        tensors = [p for _, p in self.trainable] + self.ema.shadow + list(self.critic.parameters())
        mine = torch.stack([t.detach().double().sum() for t in tensors])
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        if not all(torch.equal(mine, other) for other in every):
            raise RuntimeError(f"rank {self.rank}: weights differ between ranks at step {self.step_count}")

    def _apply_decoder(self, rec_total) -> dict:
        params = [p for _, p in self.trainable]
        self.scaler.unscale_(self.opt)
        max_norm = self.s.grad_clip if self.s.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        overflow_ok = self.scaler.is_enabled()  # fp16: the scaler skips inf grads itself
        if not torch.isfinite(rec_total) or (not overflow_ok and not torch.isfinite(norm)):
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

    def _set_lr(self, step: int) -> None:
        f = self.s.lr_factor(step)
        for g in self.opt.param_groups:
            g["lr"] = self.s.lr * f
        for g in self.opt_critic.param_groups:
            g["lr"] = self.s.critic_lr * f

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
        opt_t, opt_meta = ckpt_lib.optimizer_tensors(self.opt)
        copt_t, copt_meta = ckpt_lib.optimizer_tensors(self.opt_critic)
        tensors = {"decoder": decoder_state(self.vae), "ema": self.ema.state_dict(),
                   "critic": self.critic.state_dict(), "optim_decoder": opt_t, "optim_critic": copt_t}
        state = dict(extra, skipped=self.skipped, optim_decoder=opt_meta, optim_critic=copt_meta,
                     scaler=self.scaler.state_dict(), settings=dataclasses.asdict(self.s),
                     processes=self.world_size, cpu_threads=torch.get_num_threads())  # compared on resume
        return ckpt_lib.save_checkpoint(ckpt_root, self.step_count, tensors, state, keep)

    def load(self, ckpt_dir: Path) -> None:
        """Strict: every tensor and optimizer slot must be there (checkpoint.restore names the gap)."""
        state = ckpt_lib.restore(ckpt_dir, self.vae, self.ema, self.critic, self.opt, self.opt_critic, self.scaler)
        self.step_count, self.skipped = state["step"], state.get("skipped", 0)
