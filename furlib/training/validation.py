"""One check of every 02 parameter; 02, ``python -m furlib.training.fit`` and launches call it.

``validate(settings)`` raises one ``ValueError`` listing every bad parameter as
``name=value: what is allowed``, so a profile with three mistakes costs one run, not three.
Types come from the defaults in ``TrainSettings``: YAML's bare ``yes``/``no`` is a boolean, and
a string parameter given one is named with that hint.
"""

import dataclasses
import re

AUTO_YES_NO = ("auto", "yes", "no")
YAML_HINT = " (YAML reads a bare yes/no as a boolean: quote it)"


def _choices() -> dict:
    """name -> allowed values (imported here: no work at import time)."""
    from furlib import perceptual
    from furlib.training import critic, crops
    from furlib.training.settings import PRECISIONS

    return {"latent_mode": ("sample", "mode"), "color_space": ("oklab", "rgb"),
            "gan_loss": critic.GAN_LOSSES, "critic_norm": critic.NORMS, "critic_input": critic.CRITIC_INPUTS,
            "lr_schedule": ("constant", "cosine"), "mixed_precision": tuple(PRECISIONS),
            "torch_compile": AUTO_YES_NO, "channels_last": AUTO_YES_NO, "phase_upsample": AUTO_YES_NO,
            "pixel_cache": crops.PIXEL_CACHE_CHOICES, "lpips_backbone": perceptual.BACKBONES,
            "on_bad_checkpoint": ("fallback", "refuse")}


# name -> (test of the value, what is allowed); applied only when the value has the right type
RANGES = {
    "batch_size": (lambda v: v >= 1, "an integer >= 1 (images per GPU per step)"),
    "grad_accum": (lambda v: v >= 1, "an integer >= 1 that divides batch_size"),
    "max_steps": (lambda v: v >= 1, "an integer >= 1"),
    "seed": (lambda v: v >= 0, "an integer >= 0"),
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
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    else:  # a list of parameter names
        ok, kind = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), "a list of names"
    if ok:
        return None
    return f"{name}={value!r}: must be {kind}" + (YAML_HINT if isinstance(value, bool) else "")


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


def validate(settings) -> None:
    found = problems(settings)
    if found:
        raise ValueError("invalid 02_train parameter(s):\n  " + "\n  ".join(found))
