"""The decoder's loss: pixel terms in Oklab (or RGB), LPIPS, and LDM's adaptive critic weight.

Hand-written where no library fits: the Oklab pixel loss with its weight schedule, and the
adaptive weight. Conventions: ``recon_m11`` and ``target_m11`` are ``rgb_m11`` NCHW.

LDM sets the critic term's weight each step from the gradients both terms send into the
decoder's last layer (diffusers: ``decoder.conv_out.weight``)::

    w = clamp(||d rec / d W|| / (||d gan / d W|| + 1e-4), 0, 1e4).detach() * disc_weight

``last_layer_grads`` computes ``d loss / d W`` from the layer's input features and the loss's
gradient at the layer's output, so both norms cost one small weight-gradient convolution
each, not a backward through the decoder (which then runs once, on the weighted sum).
"""

import contextlib
import math

import torch
from torch import nn

from furlib.oklab import rgb_to_oklab

COLOR_SPACES = ("oklab", "rgb")


def cosine_ramp(step: int, start: float, end: float, steps: int) -> float:
    """``start`` at step 0 to ``end`` at ``steps`` along a half cosine; ``end`` after."""
    if steps <= 0:
        return end
    t = min(step / steps, 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


class ReconstructionLoss(nn.Module):
    """mae_w * L1 + mse_w * L2 (in ``color_space``, per-pixel means) + lpips_w * LPIPS (RGB).

    LPIPS runs in fp32 (TF32 where the caller allows it) even inside the step's bf16/fp16
    autocast: under bf16 its input-gradient differed from fp32 by ~21% (random VGG backbone,
    issue 12), and in fp16 its backward underflows. ``lpips_autocast=True`` runs it under the
    caller's autocast instead, to measure what fp32 costs (``benchmarks/train_step.py``).
    """

    def __init__(self, color_space: str = "oklab", lpips: nn.Module | None = None,
                 lpips_autocast: bool = False):
        super().__init__()
        if color_space not in COLOR_SPACES:
            raise ValueError(f"color_space must be one of {COLOR_SPACES}, got {color_space!r}")
        self.color_space, self.lpips, self.lpips_autocast = color_space, lpips, lpips_autocast

    def forward(self, recon_m11, target_m11, mae_w: float, mse_w: float, lpips_w: float):
        recon, target = recon_m11.float(), target_m11.float()
        if self.color_space == "oklab":
            a, b = rgb_to_oklab(recon), rgb_to_oklab(target)
        else:
            a, b = recon, target
        diff = a - b
        mae, mse = diff.abs().mean(), diff.pow(2).mean()
        total = mae_w * mae + mse_w * mse
        logs = {"rec/mae": mae.detach(), "rec/mse": mse.detach()}
        if lpips_w and self.lpips is not None:
            fp32 = contextlib.nullcontext() if self.lpips_autocast else \
                torch.autocast(recon_m11.device.type, enabled=False)
            with fp32:
                perceptual = self.lpips(recon, target).float().mean()  # LPIPS reads [-1, 1] RGB
            total = total + lpips_w * perceptual
            logs["rec/lpips"] = perceptual.detach()
        logs["rec/total"] = total.detach()
        return total, logs


def last_layer_grads(features: torch.Tensor, grads_out: list, conv: nn.Conv2d) -> list:
    """d loss_k / d conv.weight for each d loss_k / d output in ``grads_out``, given the conv's
    input ``features``: one weight-gradient convolution for all (the features are read once)."""
    out = conv.out_channels
    grads = torch.nn.grad.conv2d_weight(features.float(), (out * len(grads_out),) + conv.weight.shape[1:],
                                        torch.cat([g.float() for g in grads_out], 1), stride=conv.stride,
                                        padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    return list(grads.split(out))


def adaptive_weight(rec_grad: torch.Tensor, gan_grad: torch.Tensor, disc_weight: float,
                    max_weight: float = 1e4) -> torch.Tensor:
    """LDM's ``calculate_adaptive_weight``: a detached scalar tensor."""
    w = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach() * disc_weight


def reference_adaptive_weight(rec_loss, gan_loss, last_layer_weight, disc_weight):
    """The plain LDM computation through autograd (slow: two backward passes); for tests."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)[0]
    return adaptive_weight(rec_grad, gan_grad, disc_weight)

