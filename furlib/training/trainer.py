"""``Trainer``: the decoder, critic, optimizers, EMA and scalers of one run, stepped and saved.

Where things are: the settings in ``furlib.training.settings``; the step itself (what happens
to a batch) in ``furlib.training.step``; building and compiling the parts in
``furlib.training.build``; gradient averaging over processes in ``furlib.training.grad_sync``;
the loop (logging, checkpoints, previews) in ``furlib.training.fit``.
"""

import contextlib
import dataclasses
from pathlib import Path

import torch

from furlib.training import build, grad_sync
from furlib.training import checkpoint as ckpt_lib
from furlib.training import step as step_lib
from furlib.training.critic import PatchCritic
from furlib.training.ema import EMA
from furlib.training.losses import ReconstructionLoss
from furlib.models import decoder_state, split_trainable
from furlib.oklab import rgb_to_oklab
from furlib.training.settings import PRECISIONS, TrainSettings
from furlib.training.step import FeatureTap, NonFiniteError, nonfinite_message  # noqa: F401 (callers import them here)


class Trainer:
    """With ``world_size`` > 1 (an initialised ``torch.distributed`` group, e.g. from accelerate),
    each process steps its own batch and gradients are averaged before every update, so
    weights, EMA and critic stay identical on all ranks; ``batch_size`` is per process.
    ``tuning``: benchmark and test levers (``build.Tuning``), not recipe parameters."""

    def __init__(self, vae, settings: TrainSettings, device: torch.device, lpips=None,
                 rank: int = 0, world_size: int = 1, tuning: build.Tuning | None = None):
        settings.validate()
        self.rank, self.world_size = rank, world_size
        if settings.lpips_weight and lpips is None:
            raise ValueError("lpips_weight > 0 needs an LPIPS module (furlib.perceptual.LPIPS)")
        s, self.s, self.device = settings, settings, torch.device(device)
        self.tuning = tuning or build.Tuning()
        self.vae = vae.to(self.device)
        self.trainable = split_trainable(self.vae)
        if s.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
        self.tap = FeatureTap(self.vae.decoder.conv_out)
        self.rec_loss = ReconstructionLoss(s.color_space, lpips.to(self.device) if lpips else None,
                                           self.tuning.lpips_autocast)
        with torch.random.fork_rng(devices=[]):  # the critic's start is the run's seed's, whatever the base
            torch.manual_seed(s.seed)
            self.critic = PatchCritic(s.critic_layers, s.critic_channels, s.critic_norm, s.critic_input)
        self.critic = self.critic.to(self.device)
        # critic_scores: the critic for first-order passes (maybe compiled; the penalty runs critic)
        self.layout, self.critic_scores = build.speed_up(self.vae, self.critic, self.rec_loss, s,
                                                         self.device, self.tuning)
        self.opt, self.opt_critic = build.optimizers([p for _, p in self.trainable],
                                                     list(self.critic.parameters()), s, self.device)
        self.ema = EMA(self.trainable, s.ema_decay_for(s.batch_size * world_size))
        self.scaler, self.critic_scaler = build.scalers(s, self.device)
        self.step_count, self.skipped, self.bad_streak = 0, 0, 0

    def step(self, batch_m11: torch.Tensor) -> dict:
        """One optimizer step on a CPU or device batch; returns logs (see ``furlib.training.step``)."""
        return step_lib.train_step(self, batch_m11)

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
        grad_sync.check_in_sync(tensors, self.rank, self.world_size, self.step_count)

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
                     scaler=self.scaler.state_dict(), critic_scaler=self.critic_scaler.state_dict(),
                     settings=dataclasses.asdict(self.s),
                     processes=self.world_size, cpu_threads=torch.get_num_threads())  # compared on resume
        return ckpt_lib.save_checkpoint(ckpt_root, self.step_count, tensors, state, keep)

    def load(self, ckpt_dir: Path) -> None:
        """Strict: every tensor and optimizer slot must be there (checkpoint.restore names the gap)."""
        state = ckpt_lib.restore(ckpt_dir, self.vae, self.ema, self.critic, self.opt, self.opt_critic, self.scaler)
        self.step_count, self.skipped = state["step"], state.get("skipped", 0)
        if state.get("critic_scaler"):  # fp16: the critic's own loss scale resumes where it was
            self.critic_scaler.load_state_dict(state["critic_scaler"])
