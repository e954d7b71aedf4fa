"""The settings of a training run: ``TrainSettings``, whose field names are 02's parameters.

``TrainSettings`` is the one home of every 02 parameter's default (the run, the data, the recipe
and the checkpoint cadence); its field names are the 02 notebook's parameters, and a test keeps the
notebook's parameters cell identical to these defaults. Every ``TrainSettings`` is checked once,
when it is made (``__post_init__``, below): 02, ``python -m furlib.training.fit`` and launches
all build one, so none can skip the check. It raises one ``ValueError`` listing every bad parameter as
``name=value: what is allowed``, so a profile with three mistakes costs one run, not three.
Types come from the defaults in ``TrainSettings``: YAML's bare ``yes``/``no`` is a boolean, and
a string parameter given one is named with that hint.

Settings only: the step that uses them is ``furlib.training.trainer`` and the loop is
``furlib.training.fit``. Loss weights are in plain-mean units (mean absolute / mean squared error
per pixel and channel, in Oklab by default); the Furception author's "MSE 10" on optax's
``l2_loss`` (half the squared error) is 5 here.
"""

import dataclasses
import math
import re

import torch

from furlib.parameters import SEED_LIMIT
from furlib.training.ema import scaled_decay
from furlib.training.losses import cosine_ramp

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


@dataclasses.dataclass
class TrainSettings:
    """02's parameters cell, line for line: the same names in the same order, each with its
    default and its comment (``tests/test_run_safety.py`` compares the two). In that order: the
    run and its data (to ``min_crop_scale``); the recipe (to ``gradient_checkpointing``);
    checkpoints and logs (to ``preview_images``); then ablations and rare knobs."""

    run_name: str = "my_run"                # outputs go to outputs_dir/run_name ("demo" is make demo's)
    outputs_dir: str = "outputs"            # root folder of all runs
    base_model: str = "stabilityai/sd-vae-ft-mse"  # hub id, diffusers folder, .safetensors, "tiny", "tiny-random" or "random:sd"
    base_config: str = ""                   # diffusers folder with the config of a .safetensors base
    base_family: str = ""                   # "sd", "sdxl", "sd3" or "flux"; empty: from the config (a .safetensors base needs one)
    device: str = "auto"                    # "auto", "cuda", "cpu"
    num_gpus: int = 1                       # processes, one GPU each (accelerate); batch_size is per GPU
    resolution: int = 256                   # training crop side, px (multiple of 8, at least 32)
    batch_size: int = 32                    # images per optimizer step on each GPU (all its micro-batches together)
    grad_accum: int = 1                     # micro-batches per step (batch_size / grad_accum images each)
    max_steps: int = 150_000                # optimizer steps
    seed: int = 0                           # random seed: crops, posterior noise, penalty interpolates, random weights
    num_workers: int = 4                    # data loader processes per GPU (capped to the CPU cores)
    pixel_cache: str = "auto"               # decoded-PNG cache in <run>/pixel_cache: "auto" (fits half the free disk), "yes", "no"
    min_crop_scale: float = 0.08            # smallest crop, as a fraction of the image area
    mae_weight: float = 1.0                 # L1 weight at step 0
    mae_weight_end: float = 1.0             # L1 weight after loss_schedule_steps (cosine between); without one it must match mae_weight
    mse_weight: float = 5.0                 # L2 (plain mean) weight at step 0; 5: the card's 10 on half sq. error
    mse_weight_end: float = 5.0             # L2 weight after loss_schedule_steps; without one it must match mse_weight
    loss_schedule_steps: int = 0            # 0: constant pixel-loss weights (mae_weight, mse_weight)
    lpips_weight: float = 1.0               # LPIPS(VGG) weight
    lpips_backbone: str = "pretrained"      # "pretrained", or "random" (offline opt-in, not perceptual)
    disc_weight: float = 0.5                # critic term's grad norm relative to the reconstruction's
    gan_loss: str = "wgan-gp"               # "wgan-gp", "hinge" (LDM) or "ns-r1"
    gp_weight: float = 10.0                 # WGAN-GP lambda
    critic_norm: str = "pixel_layer"        # "pixel_layer" (card: LN over channels per pixel), "sample_layer", "batch", "none"
    critic_start: int = 0                   # step the critic starts training
    gan_start: int = 0                      # step the decoder starts receiving the critic term
    lr: float = 5e-7                        # decoder AdamW learning rate after warm-up
    critic_lr: float = 5e-7                 # critic AdamW learning rate (no warm-up)
    adam_beta1: float = 0.5                 # AdamW beta1, both optimizers
    adam_beta2: float = 0.9                 # AdamW beta2, both optimizers
    weight_decay: float = 1e-4              # AdamW decoupled weight decay, both optimizers (the author's value)
    warmup_steps: int = 5000                # linear warm-up of the decoder learning rate, steps (critic: none)
    ema_decay: float = 0.0                  # 0: ema_ref_decay scaled from ema_ref_batch to the global batch
    mixed_precision: str = "bf16"           # "bf16", "fp16" (grad scaling, e.g. T4) or "no"
    gradient_checkpointing: bool = False    # trade compute for decoder activation memory
    resume: bool = True                     # continue the run's latest checkpoint (False: refuse to overwrite one)
    checkpoint_every: int = 2000            # steps between checkpoints
    keep_checkpoints: int = 3               # newest checkpoints kept (0: all)
    log_every: int = 10                     # steps between log rows
    plot_every: int = 5000                  # steps between inline dashboards (0: only at the end)
    preview_images: int = 4                 # fixed val images in the reconstruction strip
    color_space: str = "oklab"              # pixel losses in "oklab" or "rgb"
    latent_mode: str = "sample"             # "sample" the posterior or use its "mode"
    critic_input: str = "rgb"               # critic reads "rgb" or "oklab"
    critic_layers: int = 3                  # PatchGAN depth (3: 30x30 patches at 256 px)
    critic_channels: int = 64               # PatchGAN base width
    r1_gamma: float = 10.0                  # R1 gamma for ns-r1
    drift_weight: float = 0.0               # WGAN drift term on the real scores squared
    lr_schedule: str = "constant"           # "constant" or "cosine" (to 0 at max_steps) after warm-up
    grad_clip: float = 0.0                  # max decoder grad norm, 0: off
    ema_ref_decay: float = 0.999            # sd-vae-ft-mse's EMA decay, at ema_ref_batch images a step
    ema_ref_batch: int = 192                # images a step of ema_ref_decay
    max_bad_steps: int = 20                 # consecutive non-finite steps before stopping
    torch_compile: str = "auto"             # compile encoder, decoder, LPIPS, critic: "auto" (on CUDA), "yes", "no"
    phase_upsample: str = "auto"            # upsampling convs as 2x2 phase convs, same maths: "auto" (on CUDA), "yes", "no"
    channels_last: str = "auto"             # NHWC convolutions: "auto" (on CUDA when not compiled), "yes", "no"
    compile_cache_dir: str = ""             # torch.compile's cache: "" torch's in /tmp (kept over a kernel restart); a Drive folder: kept over new VMs
    resume_with_changes: list = dataclasses.field(default_factory=list)  # recipe settings a resume may change, e.g. ["lr"]
    on_bad_checkpoint: str = "fallback"     # damaged latest: "fallback" to the newest good one (loud), or "refuse"
    train_source: str = ""                  # "": 01's data/train; else a parquet/arrow file or folder, or a hub id, streamed (no dedup)
    source_split: str = "train"             # split of a train_source dataset
    image_column: str = "image"             # image column of a train_source dataset

    @classmethod
    def from_params(cls, params: dict) -> "TrainSettings":
        """Settings from a parameter dict (02's, a profile's); unknown names and bad values raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"02_train has no parameter(s) {unknown}; its parameters are the fields of "
                             "furlib.training.settings.TrainSettings (check the spelling)")
        return cls(**params)  # checked in __post_init__

    def global_batch(self, processes: int) -> int:
        """Images per optimizer step over all processes: batch_size is per process (per GPU)."""
        return self.batch_size * processes

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every parameter at once; a ValueError names each bad one, its value and what is allowed."""
        from furlib.training.losses import check_norm

        check_norm(self.critic_norm)  # a renamed norm's error names its new name
        found = problems(self)
        if found:
            raise ValueError("invalid 02_train parameter(s):\n  " + "\n  ".join(found))

    def ema_decay_for(self, images_per_step: int) -> float:
        """``ema_decay``, or the reference decay scaled to the images of one optimizer step."""
        return self.ema_decay or scaled_decay(images_per_step, self.ema_ref_decay, self.ema_ref_batch)

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


# The checks

AUTO_YES_NO = ("auto", "yes", "no")
YAML_HINT = " (YAML reads a bare yes/no as a boolean: quote it)"


def _choices() -> dict:
    """name -> allowed values (imported here: no work at import time)."""
    from furlib import crops, families, perceptual
    from furlib.training import losses

    return {"latent_mode": ("sample", "mode"), "color_space": ("oklab", "rgb"),
            "gan_loss": losses.GAN_LOSSES, "critic_norm": losses.NORMS, "critic_input": losses.CRITIC_INPUTS,
            "lr_schedule": ("constant", "cosine"), "mixed_precision": tuple(PRECISIONS),
            "torch_compile": AUTO_YES_NO, "channels_last": AUTO_YES_NO, "phase_upsample": AUTO_YES_NO,
            "pixel_cache": crops.PIXEL_CACHE_CHOICES, "lpips_backbone": perceptual.BACKBONES,
            "on_bad_checkpoint": ("fallback", "refuse"), "base_family": ("", *families.CHOICES)}


# name -> (test of the value, what is allowed); applied only when the value has the right type
RANGES = {
    "batch_size": (lambda v: v >= 1, "an integer >= 1 (images per GPU per step)"),
    "grad_accum": (lambda v: v >= 1, "an integer >= 1 that divides batch_size"),
    "max_steps": (lambda v: v >= 1, "an integer >= 1"),
    "seed": (lambda v: 0 <= v < SEED_LIMIT, "an integer in [0, 2**32)"),
    "num_gpus": (lambda v: v >= 1, "an integer >= 1"),
    "resolution": (lambda v: v >= 32 and v % 8 == 0, "a multiple of 8, at least 32 (px; the VAE downsamples 8x)"),
    "min_crop_scale": (lambda v: 0 < v <= 1, "a fraction in (0, 1] of the image area"),
    "num_workers": (lambda v: v >= 0, "an integer >= 0 (0: load in the training process)"),
    "lr": (lambda v: v > 0, "a number > 0"),
    "critic_lr": (lambda v: v >= 0, "a number >= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "ema_decay": (lambda v: 0 <= v < 1, "0 (scaled from ema_ref_decay) or a decay in (0, 1)"),
    "ema_ref_decay": (lambda v: 0 < v < 1, "a decay in (0, 1)"),
    "ema_ref_batch": (lambda v: v >= 1, "an integer >= 1"),
    "critic_layers": (lambda v: v >= 1, "an integer >= 1"),
    "critic_channels": (lambda v: v >= 1, "an integer >= 1"),
    "max_bad_steps": (lambda v: v >= 1, "an integer >= 1"),
    "checkpoint_every": (lambda v: v >= 1, "an integer >= 1 (steps)"),
    "log_every": (lambda v: v >= 1, "an integer >= 1 (steps)"),
    "plot_every": (lambda v: v >= 0, "an integer >= 0 (steps; 0: only at the end)"),
    "keep_checkpoints": (lambda v: v >= 0, "an integer >= 0 (0: keep all)"),
    "preview_images": (lambda v: v >= 1, "an integer >= 1"),
    "base_model": (lambda v: v.strip() != "", "a hub id, a folder, a .safetensors file, 'tiny' or 'random:sd'"),
    "run_name": (lambda v: v != "" and not re.search(r"[/\\]", v) and not v.startswith("."),
                 "a plain folder name (no '/', not starting with '.')"),
    "device": (lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None, "'auto', 'cpu', 'cuda' or 'cuda:N'"),
}
NON_NEGATIVE = ("mae_weight", "mae_weight_end", "mse_weight", "mse_weight_end", "loss_schedule_steps",
                "lpips_weight", "disc_weight", "gp_weight", "r1_gamma", "drift_weight", "critic_start",
                "gan_start", "weight_decay", "warmup_steps", "grad_clip")


def _type_error(name: str, value, default) -> str | None:
    """What is wrong with the type of ``value`` for a field whose default is ``default``."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value)), "a finite number"  # lr=inf would train NaNs to the end
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    else:  # a list of parameter names
        ok, kind = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), "a list of names"
    if ok:
        return None
    from furlib.parameters import hint

    return (f"{name}={value!r}: must be {kind}" + (YAML_HINT if isinstance(value, bool) else "")
            + hint(value, type(default)))


def problems(settings) -> list[str]:
    """Every problem of ``settings``, one line each (empty: all good)."""
    fields = dataclasses.fields(settings)
    out = []
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        bad_type = _type_error(f.name, getattr(settings, f.name), default)
        if bad_type:
            out.append(bad_type)
    typed_ok = {f.name for f in fields} - {line.split("=", 1)[0] for line in out}
    rules = dict(RANGES, **{n: (lambda v: v >= 0, "a number >= 0") for n in NON_NEGATIVE})
    for name, allowed in _choices().items():
        rules[name] = (lambda v, allowed=allowed: v in allowed, f"one of {list(allowed)}")
    for name, (test, allowed) in rules.items():
        value = getattr(settings, name)
        if name in typed_ok and not test(value):
            out.append(f"{name}={value!r}: must be {allowed}")
    return out + _relations(settings, typed_ok)


def _relations(s, typed_ok: set) -> list[str]:
    """Checks that tie two parameters together, or the parameters to the machine."""
    out = []
    if {"batch_size", "grad_accum"} <= typed_ok and s.grad_accum >= 1 and s.batch_size % s.grad_accum:
        out.append(f"grad_accum={s.grad_accum!r}: must divide batch_size={s.batch_size} (micro-batches of equal size)")
    for start in ("mae_weight", "mse_weight"):  # without a schedule an end weight is never reached
        end = f"{start}_end"
        first, last = getattr(s, start), getattr(s, end)
        if {start, end, "loss_schedule_steps"} <= typed_ok and s.loss_schedule_steps == 0 and first != last:
            out.append(f"{start}={first!r} but {end}={last!r} with loss_schedule_steps=0 (constant weights): "
                       f"set {end} to {first!r} too, or set loss_schedule_steps to ramp from one to the other")
    if {"gan_start", "critic_start", "disc_weight"} <= typed_ok and s.disc_weight > 0 and s.gan_start < s.critic_start:
        out.append(f"gan_start={s.gan_start!r} is before critic_start={s.critic_start!r}: the decoder would be pushed "
                   f"by an untrained critic for {s.critic_start - s.gan_start} steps; set gan_start to at least critic_start")
    # resolution >= 3 * 2**layers, compared through the exponent (a huge critic_layers would make
    # 2**layers a number too large to print, or to compute in reasonable time)
    deepest = (s.resolution // 3).bit_length() - 1 if "resolution" in typed_ok else 0
    if {"resolution", "critic_layers"} <= typed_ok and s.critic_layers > deepest:
        need = 3 * 2 ** s.critic_layers if s.critic_layers <= 40 else f"3 x 2**{s.critic_layers}"
        out.append(f"critic_layers={s.critic_layers!r} needs resolution >= {need} (each layer halves the image; its "
                   f"last convolutions need 3 px): at resolution={s.resolution} use at most {max(1, deepest)}")
    if "resume_with_changes" in typed_ok:
        names = {f.name for f in dataclasses.fields(s)} | {"processes"}
        unknown = [n for n in s.resume_with_changes if n not in names]
        if unknown:
            out.append(f"resume_with_changes={list(s.resume_with_changes)!r}: {unknown} are not 02 parameters "
                       "(list parameter names, or 'processes' for a changed GPU count)")
    if "num_gpus" in typed_ok and s.num_gpus > 1:
        import torch

        visible = torch.cuda.device_count()
        if visible < s.num_gpus:
            out.append(f"num_gpus={s.num_gpus}: " + (
                f"only {visible} CUDA GPU(s) are visible (use at most {visible}, or 1 for a single process)"
                if visible else "no CUDA GPU is visible (Colab: Runtime > Change runtime type > a GPU; "
                "Kaggle: Settings > Accelerator); num_gpus=1 trains in one process, on the CPU here"))
    return out
