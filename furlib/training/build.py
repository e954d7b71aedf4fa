"""Set-up of a run's parts on the device: layout, phase upsampling, compilation, optimizers.

None of the speed levers changes what is computed (``tests/test_train.py`` compares each with
the plain path). ``Tuning`` holds the levers a benchmark or test may change that are not
recipe parameters: 02 never sets them, so a run's record does not need them.
"""

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from furlib.training.upsample import use_phase_upsampling

# Inductor's NHWC conversion, forced: left to its heuristic, the backward graph mixes layouts and
# cuDNN's convolution_backward copies ~0.5 GB activations to match them (~40 ms a step at 256 px,
# batch 32 on an H100); forced on an NCHW model: 273 -> 231 ms (benchmarks/RESULTS.md).
COMPILE_OPTIONS = {"force_layout_optimization": True}


@dataclasses.dataclass
class Tuning:
    inductor_options: dict = dataclasses.field(default_factory=lambda: dict(COMPILE_OPTIONS))
    compile_critic: bool = True     # a compiled twin for the critic's first-order passes
    lpips_autocast: bool = False    # LPIPS under the step's autocast, not fp32 (changes results)
    part_timer: Callable[[str], AbstractContextManager] | None = None  # wraps each part of the step


def speed_up(vae, critic, rec_loss, settings, device: torch.device, tuning: Tuning):
    """Layout, phase upsampling and compilation, in place; returns (memory layout, the critic
    for first-order passes)."""
    compiled = settings.uses("torch_compile", device)
    if settings.uses("phase_upsample", device):
        use_phase_upsampling(vae.decoder)  # keeps the state-dict keys
    # compiled graphs choose their own layouts (see COMPILE_OPTIONS): "auto" NHWC is for eager
    nhwc = settings.channels_last == "yes" or (
        settings.channels_last == "auto" and not compiled and device.type == "cuda")
    layout = torch.channels_last if nhwc else torch.contiguous_format
    for module in (vae, critic, rec_loss):
        module.to(memory_format=layout)
    scores = critic
    if compiled:
        # in place, so state-dict keys and the feature hook stay
        for module in (vae.encoder, vae.decoder, rec_loss.lpips):
            if module is not None:
                module.compile(options=tuning.inductor_options)
        if tuning.compile_critic:
            # a compiled twin sharing the weights: the penalty's double backward runs the eager
            # critic, because compiled graphs have no double backward
            scores = torch.compile(critic, options=tuning.inductor_options)
    return layout, scores


def optimizers(decoder_params: list, critic_params: list, settings, device: torch.device):
    """AdamW for the decoder and for the critic, the same betas and weight decay."""
    fused = device.type == "cuda"
    betas = (settings.adam_beta1, settings.adam_beta2)
    opt = torch.optim.AdamW(decoder_params, lr=settings.lr, betas=betas,
                            weight_decay=settings.weight_decay, fused=fused)
    opt_critic = torch.optim.AdamW(critic_params, lr=settings.critic_lr, betas=betas,
                                   weight_decay=settings.weight_decay, fused=fused)
    return opt, opt_critic


def scalers(settings, device: torch.device):
    """fp16 loss scalers, one for the decoder's backward passes and one for the critic's: each
    model skips its own overflowing steps and keeps its own scale (disabled unless fp16)."""
    on = settings.mixed_precision == "fp16"
    return torch.amp.GradScaler(device.type, enabled=on), torch.amp.GradScaler(device.type, enabled=on)
