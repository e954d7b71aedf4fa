"""The settings of a training run: ``TrainSettings``, whose field names are 02's parameters.

``TrainSettings`` is the one home of every 02 parameter's default (the run, the data, the recipe
and the checkpoint cadence); its field names are the 02 notebook's parameters, and a test keeps the
notebook's parameters cell identical to these defaults. ``validate()`` checks them all
(``furlib.training.validation``); 02, ``python -m furlib.training.fit`` and launches all call it.

Settings only: the step that uses them is ``furlib.training.step``, the object that holds a run's
models and optimizers is ``furlib.training.trainer.Trainer``, and the loop is
``furlib.training.fit``. Loss weights are in plain-mean units (mean absolute / mean squared error
per pixel and channel, in Oklab by default); the Furception author's "MSE 10" on optax's
``l2_loss`` (half the squared error) is 5 here.
"""

import dataclasses
import math

import torch

from furlib.training.ema import scaled_decay
from furlib.training.losses import cosine_ramp

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


@dataclasses.dataclass
class TrainSettings:
    # the run and its inputs
    run_name: str = "my_run"        # outputs go to outputs_dir/run_name ("demo" is make demo's)
    outputs_dir: str = "outputs"
    base_model: str = "stabilityai/sd-vae-ft-mse"  # hub id, diffusers folder, .safetensors, "tiny", "random:sd"
    base_config: str = ""           # diffusers folder with the config of a .safetensors base
    base_family: str = ""           # "sd", "sdxl", "sd3", "flux"; empty: the base's config says (a single file needs one)
    device: str = "auto"            # "auto", "cuda", "cpu"
    num_gpus: int = 1               # processes, one GPU each (accelerate); batch_size is per GPU
    resolution: int = 256           # training crop side, px (multiple of 8, at least 32)
    min_crop_scale: float = 0.08    # smallest crop, as a fraction of the image area
    num_workers: int = 4            # data loader processes per GPU (capped to the CPU cores)
    pixel_cache: str = "auto"       # decoded-PNG cache: "auto" (fits half the free disk), "yes", "no"
    lpips_backbone: str = "pretrained"  # "pretrained", or "random" (offline opt-in, not perceptual)
    # the recipe
    batch_size: int = 32            # images per optimizer step (all micro-batches together)
    grad_accum: int = 1             # micro-batches per step
    max_steps: int = 150_000        # optimizer steps
    seed: int = 0
    latent_mode: str = "sample"     # "sample" the posterior, or take its "mode"
    color_space: str = "oklab"      # pixel losses in "oklab" or "rgb"
    mae_weight: float = 1.0         # L1 weight at step 0
    mae_weight_end: float = 1.0     # ... and after loss_schedule_steps (cosine in between)
    mse_weight: float = 5.0         # plain-mean MSE; 5 = the author's 10 on half squared error
    mse_weight_end: float = 5.0
    loss_schedule_steps: int = 0    # 0: constant weights
    lpips_weight: float = 1.0
    disc_weight: float = 0.5        # critic grad norm = disc_weight x reconstruction grad norm
    gan_loss: str = "wgan-gp"       # "wgan-gp", "hinge" or "ns-r1"
    gp_weight: float = 10.0         # WGAN-GP lambda
    r1_gamma: float = 10.0          # ns-r1 gamma
    drift_weight: float = 0.0       # WGAN drift epsilon on real scores^2
    critic_norm: str = "pixel_layer"  # "pixel_layer" (card's), "sample_layer", "batch", "none"
    critic_input: str = "rgb"
    critic_layers: int = 3
    critic_channels: int = 64
    critic_start: int = 0           # step from which the critic trains
    gan_start: int = 0              # step from which the decoder gets the critic term
    lr: float = 5e-7                # decoder AdamW learning rate after warm-up
    critic_lr: float = 5e-7
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    weight_decay: float = 1e-4      # AdamW decoupled decay, both optimizers (the author's value)
    warmup_steps: int = 5000        # linear warm-up of the decoder's learning rate (the critic's has none)
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
    # checkpoints, resume and logs
    resume: bool = True             # continue the run's latest checkpoint (False: refuse to overwrite one)
    resume_with_changes: list = dataclasses.field(default_factory=list)  # recipe settings a resume may change
    on_bad_checkpoint: str = "fallback"  # damaged latest: "fallback" to the newest good one (loud), or "refuse"
    checkpoint_every: int = 2000    # steps between checkpoints
    keep_checkpoints: int = 3       # newest checkpoints kept (0: all)
    log_every: int = 10             # steps between log rows
    plot_every: int = 5000          # steps between inline dashboards (0: only at the end)
    preview_images: int = 4         # fixed val images in the reconstruction strip
    # data that was never prepared: streamed by each rank and loader worker (furlib.training.streaming)
    train_source: str = ""          # "": 01's data/train; else a parquet/arrow file or folder, or a hub dataset id
    source_split: str = "train"     # split of a train_source dataset (01's name for the same thing)
    image_column: str = "image"     # image column of a train_source dataset

    @classmethod
    def from_params(cls, params: dict) -> "TrainSettings":
        """Settings from a parameter dict (02's, a profile's); unknown names and bad values raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"02_train has no parameter(s) {unknown}; its parameters are the fields of "
                             "furlib.training.settings.TrainSettings (check the spelling)")
        settings = cls(**params)
        settings.validate()
        return settings

    def global_batch(self, processes: int) -> int:
        """Images per optimizer step over all processes: batch_size is per process (per GPU)."""
        return self.batch_size * processes

    def validate(self) -> None:
        """Every parameter at once; a ValueError names each bad one, its value and what is allowed."""
        from furlib.training import critic as critic_lib
        from furlib.training.validation import validate

        critic_lib.check_norm(self.critic_norm)  # a renamed norm's error names its new name
        validate(self)

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

    def lr_factor(self, step: int, warmup: bool = True) -> float:
        """The learning rate's multiplier at ``step``: linear warm-up (``warmup``: the decoder's;
        the critic's has none, as in the author's code), then constant or cosine."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if warmup and self.warmup_steps > 0 else 1.0
        if self.lr_schedule == "cosine":
            warm *= 0.5 * (1.0 + math.cos(math.pi * min(step / self.max_steps, 1.0)))
        return warm

    def loss_weights(self, step: int) -> tuple[float, float]:
        s = self.loss_schedule_steps
        return (cosine_ramp(step, self.mae_weight, self.mae_weight_end, s),
                cosine_ramp(step, self.mse_weight, self.mse_weight_end, s))

