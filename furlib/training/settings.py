"""One training step of the Furception recipe, and the state that makes it resumable.

``TrainSettings`` holds the recipe; its field names are the 02 notebook's parameters.
``Trainer.step(batch_m11)`` runs one optimisation step on an ``rgb_m11`` NCHW batch:

1. the frozen encoder gives latents (posterior sample or mode); the decoder reconstructs;
2. the reconstruction loss (Oklab L1/L2 + LPIPS) and the critic term are differentiated with
   respect to the *reconstruction* only, then the adaptive weight comes from the last layer's
   weight gradients (``losses.last_layer_grads``), and the decoder runs one backward on
   ``d_rec + w * d_gan`` -- the same gradients as LDM's ``rec + w * gan``;
3. non-finite steps are skipped (no optimizer or EMA update) and counted;
4. AdamW and the EMA update; then the critic's step on real vs. detached reconstructions.

All randomness of a step (posterior noise, penalty interpolates) is drawn from generators
seeded by (seed, step), so a resumed run repeats an uninterrupted one exactly.
"""

import dataclasses
import math

import torch

from furlib.training import critic as critic_lib
from furlib.training.ema import scaled_decay
from furlib.training.losses import cosine_ramp

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


@dataclasses.dataclass
class TrainSettings:
    batch_size: int = 32            # images per optimizer step (all micro-batches together)
    grad_accum: int = 1             # micro-batches per step
    max_steps: int = 150_000        # optimizer steps
    seed: int = 0
    latent_mode: str = "sample"     # "sample" the posterior, or take its "mode"
    color_space: str = "oklab"      # pixel losses in "oklab" or "rgb"
    mae_weight: float = 1.0         # L1 weight at step 0
    mae_weight_end: float = 1.0     # ... and after loss_schedule_steps (cosine in between)
    mse_weight: float = 1.0
    mse_weight_end: float = 1.0
    loss_schedule_steps: int = 0    # 0: constant weights
    lpips_weight: float = 1.0
    disc_weight: float = 0.5        # critic grad norm = disc_weight x reconstruction grad norm
    gan_loss: str = "wgan-gp"       # "wgan-gp", "hinge" or "ns-r1"
    gp_weight: float = 10.0         # WGAN-GP lambda
    r1_gamma: float = 10.0          # ns-r1 gamma
    drift_weight: float = 0.0       # WGAN drift epsilon on real scores^2
    critic_norm: str = "layer"
    critic_input: str = "rgb"
    critic_layers: int = 3
    critic_channels: int = 64
    critic_start: int = 0           # step from which the critic trains
    gan_start: int = 0              # step from which the decoder gets the critic term
    lr: float = 5e-7                # decoder AdamW learning rate after warm-up
    critic_lr: float = 5e-7
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    weight_decay: float = 0.01
    warmup_steps: int = 5000        # linear warm-up of both learning rates
    lr_schedule: str = "constant"   # "constant" or "cosine" (to 0 at max_steps)
    grad_clip: float = 0.0          # max decoder grad norm; 0 = off
    ema_decay: float = 0.0          # 0 = ema_ref_decay scaled to the batch size
    ema_ref_decay: float = 0.999
    ema_ref_batch: int = 192
    mixed_precision: str = "bf16"   # "bf16", "fp16" (with grad scaling) or "no"
    gradient_checkpointing: bool = False
    max_bad_steps: int = 20         # consecutive non-finite steps before the run stops
    channels_last: str = "auto"     # NHWC layout for the convolutions: "auto" (CUDA, uncompiled), "yes", "no"
    torch_compile: str = "auto"     # compile encoder, decoder, LPIPS, critic: "auto" (on CUDA), "yes", "no"
    phase_upsample: str = "auto"    # decoder upsampling as 2x2 phase convs (2.25x fewer FLOPs): "auto" (CUDA)

    def validate(self) -> None:
        checks = {
            "grad_accum": self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0,
            "latent_mode": self.latent_mode in ("sample", "mode"),
            "gan_loss": self.gan_loss in critic_lib.GAN_LOSSES,
            "critic_norm": self.critic_norm in critic_lib.NORMS,
            "critic_input": self.critic_input in critic_lib.CRITIC_INPUTS,
            "lr_schedule": self.lr_schedule in ("constant", "cosine"),
            "mixed_precision": self.mixed_precision in PRECISIONS,
            "max_steps": self.max_steps >= 1,
            "disc_weight": self.disc_weight >= 0,
            "torch_compile": self.torch_compile in ("auto", "yes", "no"),
            "channels_last": self.channels_last in ("auto", "yes", "no"),
            "phase_upsample": self.phase_upsample in ("auto", "yes", "no"),
        }
        bad = {k: getattr(self, k) for k, ok in checks.items() if not ok}
        if bad:
            hint = " (YAML reads a bare yes/no as a boolean: quote it)" if any(
                isinstance(v, bool) for v in bad.values()) else ""
            raise ValueError(f"invalid training parameter(s) {bad}{hint}: see TrainSettings for choices")

    def ema_decay_for(self, images_per_step: int) -> float:
        """``ema_decay``, or the reference decay scaled to the images of one optimizer step."""
        return self.ema_decay or scaled_decay(images_per_step, self.ema_ref_decay, self.ema_ref_batch)

    @property
    def effective_ema_decay(self) -> float:  # on one process
        return self.ema_decay_for(self.batch_size)

    def uses(self, knob: str, device: torch.device) -> bool:
        """Whether an "auto"/"yes"/"no" speed knob is on for ``device`` ("auto": on CUDA)."""
        value = getattr(self, knob)
        return value == "yes" or (value == "auto" and torch.device(device).type == "cuda")

    def lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.lr_schedule == "cosine":
            warm *= 0.5 * (1.0 + math.cos(math.pi * min(step / self.max_steps, 1.0)))
        return warm

    def loss_weights(self, step: int) -> tuple[float, float]:
        s = self.loss_schedule_steps
        return (cosine_ramp(step, self.mae_weight, self.mae_weight_end, s),
                cosine_ramp(step, self.mse_weight, self.mse_weight_end, s))


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
