"""The recipe's whole loss, as latent-diffusion's one loss module: the decoder's pixel terms in
Oklab (or RGB) and LPIPS (``ReconstructionLoss``), LDM's adaptive weight of the critic term
(``adaptive_weight``, ``last_layer_grads``), the critic (``PatchCritic``) and its objectives and
penalties (``critic_loss``, ``generator_loss``). Hand-written where no library fits: the Oklab
pixel loss with its weight schedule, the critic in this form, and the adaptive weight.
Conventions: ``recon_m11`` and ``target_m11`` are ``rgb_m11`` NCHW.

## The adaptive weight
LDM sets the critic term's weight each step from the gradients both terms send into the
decoder's last layer (diffusers: ``decoder.conv_out.weight``)::

    w = clamp(||d rec / d W|| / (||d gan / d W|| + 1e-4), 0, 1e4).detach() * disc_weight

``last_layer_grads`` computes ``d loss / d W`` from the layer's input features and the loss's
gradient at the layer's output, so both norms cost one small weight-gradient convolution
each, not a backward through the decoder (which then runs once, on the weighted sum).

## The critic
The critic reads ``rgb_m11`` NCHW
(or its Oklab transform, ``critic_input='oklab'``) and returns a patch map of scores
(N, 1, h, w): 30x30 for a 256 px input with 3 layers. A sample's score is the mean of its map.

Norms (``critic_norm``), named by what one normalisation group is:
- ``pixel_layer``: the channels at each pixel (Flax's ``nn.LayerNorm()`` on NHWC, which the card's
  model was built with, and the author's public critic; eps 1e-6 as Flax's). The recipe's.
- ``sample_layer``: each sample over (C, H, W), with a per-channel affine (``GroupNorm(1, C)``): an
  ablation, the other per-sample drop-in for batch norm that WGAN-GP allows.
- ``batch`` (LDM's BatchNorm; mixes samples, so not for WGAN-GP's per-sample penalty), ``none``.
The old names ``layer`` and ``channel`` meant the two layer norms the other way round from what
readers took them for; they are refused with the new name instead of being guessed.
Objectives (``gan_loss``): ``wgan-gp`` (Gulrajani et al.: lambda 10, per-sample interpolates
and norms, optional drift), ``hinge`` (LDM), ``ns-r1`` (non-saturating with R1 on reals).
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from furlib.oklab import rgb_to_oklab
from furlib.perceptual import fp16_grad_scale, has_fp16_trunk

COLOR_SPACES = ("oklab", "rgb")


def cosine_ramp(step: int, start: float, end: float, steps: int) -> float:
    """``start`` at step 0 to ``end`` at ``steps`` along a half cosine; ``end`` after. No ramp
    (``steps`` <= 0): ``start`` throughout, the value a user set, not one never reached."""
    if steps <= 0:
        return start
    t = min(step / steps, 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def pixel_errors(recon: torch.Tensor, target: torch.Tensor, color_space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean absolute and mean squared error between fp32 ``rgb_m11`` images in ``color_space``."""
    a, b = (rgb_to_oklab(recon), rgb_to_oklab(target)) if color_space == "oklab" else (recon, target)
    diff = a - b
    return diff.abs().mean(), diff.pow(2).mean()


class ReconstructionLoss(nn.Module):
    """mae_w * L1 + mse_w * L2 (in ``color_space``, per-pixel means) + lpips_w * LPIPS (RGB).

    LPIPS runs in fp32 (TF32 where the caller allows it) even inside the step's bf16/fp16
    autocast: under bf16 its input gradient is 41-68% from fp32's (pretrained VGG; issue 12,
    ``benchmarks/lpips_precision.py``), and in fp16 its backward underflows unscaled. Compiled
    CUDA steps run its trunk alone in fp16 (``perceptual.HalfTrunk``), on a loss scaled by
    ``backward_scale`` (fp16 steps: by their loss scale): as far from fp32 as TF32.
    ``lpips_autocast=True`` runs all of it under the caller's autocast instead, to measure what
    fp32 costs (``benchmarks/train_step.py``).
    """

    def __init__(self, color_space: str = "oklab", lpips: nn.Module | None = None,
                 lpips_autocast: bool = False):
        super().__init__()
        if color_space not in COLOR_SPACES:
            raise ValueError(f"color_space must be one of {COLOR_SPACES}, got {color_space!r}")
        self.color_space, self.lpips, self.lpips_autocast = color_space, lpips, lpips_autocast
        self.pixel_errors = pixel_errors  # or its compiled form (``speed.Tuning.compile_pixel_terms``)

    def forward(self, recon_m11, target_m11, mae_w: float, mse_w: float, lpips_w: float):
        recon, target = recon_m11.float(), target_m11.float()
        mae, mse = self.pixel_errors(recon, target, self.color_space)
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

    def backward_scale(self, recon_m11: torch.Tensor) -> float:
        """The power of two this loss is multiplied by before its backward (its gradient divided
        by after): ``perceptual.fp16_grad_scale`` where LPIPS's trunk runs in fp16, else 1."""
        return fp16_grad_scale(recon_m11) if has_fp16_trunk(self.lpips) else 1.0


def last_layer_grads(features: torch.Tensor, grads_out: list, conv: nn.Conv2d,
                     dtype: torch.dtype = torch.float32) -> list:
    """d loss_k / d conv.weight for each d loss_k / d output in ``grads_out``, given the conv's
    input ``features``: one weight-gradient convolution for all (the features are read once), in
    ``dtype``, returned in fp32 (fp64 stays fp64). fp32 is TF32 on CUDA (torch's default for
    convolutions); bf16 is how the decoder's backward computes this layer's own gradient under
    autocast (``Tuning.last_layer_bf16``; what it changes: benchmarks/last_layer_precision.py)."""
    out = conv.out_channels
    grads = torch.nn.grad.conv2d_weight(features.to(dtype), (out * len(grads_out),) + conv.weight.shape[1:],
                                        torch.cat([g.to(dtype) for g in grads_out], 1), stride=conv.stride,
                                        padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    return list(grads.to(torch.promote_types(dtype, torch.float32)).split(out))


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


# The critic

NORMS = ("pixel_layer", "sample_layer", "batch", "none")
RENAMED_NORMS = {"layer": "sample_layer", "channel": "pixel_layer"}  # names before issue 12
GAN_LOSSES = ("wgan-gp", "hinge", "ns-r1")
CRITIC_INPUTS = ("rgb", "oklab")


def check_norm(norm: str) -> None:
    """A clear error for an unknown ``critic_norm``, naming the new name of a renamed one."""
    if norm in RENAMED_NORMS:
        raise ValueError(
            f"critic_norm={norm!r} is no longer a choice: it was renamed to {RENAMED_NORMS[norm]!r}. "
            "'pixel_layer' normalises the channels at each pixel (Flax nn.LayerNorm, the card's); "
            "'sample_layer' normalises each sample over (C, H, W). Set one of them.")
    if norm not in NORMS:
        raise ValueError(f"critic_norm must be one of {NORMS}, got {norm!r}")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class PixelLayerNorm(nn.Module):
    """Layer norm over the channels at every pixel of NCHW: Flax ``nn.LayerNorm()`` on NHWC.

    Both layer norms run in fp32 under any autocast, as CUDA's autocast runs ``layer_norm`` and
    ``group_norm`` anyway; CPU autocast would run them in fp16, where the penalty's double
    backward through 1/std overflows to NaN."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)  # Flax's default epsilon (torch's is 1e-5)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.norm(_at_least_fp32(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SampleLayerNorm(nn.GroupNorm):
    """Each sample normalised over (C, H, W), per-channel affine (``GroupNorm(1, C)``), in fp32."""

    def __init__(self, channels: int):
        super().__init__(1, channels)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(_at_least_fp32(x))


def _norm(kind: str, channels: int) -> nn.Module:
    return {"sample_layer": lambda: SampleLayerNorm(channels), "pixel_layer": lambda: PixelLayerNorm(channels),
            "batch": lambda: nn.BatchNorm2d(channels), "none": nn.Identity}[kind]()


class PatchCritic(nn.Module):
    """conv k4 s2 + LReLU; (layers-1) x [conv k4 s2, norm, LReLU]; conv k4 s1, norm, LReLU; conv -> 1."""

    def __init__(self, layers: int = 3, channels: int = 64, norm: str = "pixel_layer",
                 input_space: str = "rgb"):
        super().__init__()
        check_norm(norm)
        if input_space not in CRITIC_INPUTS:
            raise ValueError(f"critic_input must be one of {CRITIC_INPUTS}, got {input_space!r}")
        self.input_space = input_space
        widths = [channels * min(2**i, 8) for i in range(layers + 1)]
        body = [nn.Conv2d(3, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            body += [nn.Conv2d(widths[i - 1], widths[i], 4, stride, 1, bias=norm == "none"),
                     _norm(norm, widths[i]), nn.LeakyReLU(0.2)]
        body.append(nn.Conv2d(widths[-1], 1, 4, 1, 1))
        self.net = nn.Sequential(*body)
        self.apply(_init_weights)

    def prepare(self, rgb_m11: torch.Tensor) -> torch.Tensor:
        """Map images to the critic's input space (outside the penalty's double backward)."""
        return rgb_to_oklab(rgb_m11) if self.input_space == "oklab" else rgb_m11

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` already ``prepare``d; returns the (N, 1, h, w) score map."""
        return self.net(x)


def _init_weights(m: nn.Module) -> None:  # LDM/pix2pix init: N(0, 0.02); norms N(1, 0.02)
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def generator_loss(fake_scores: torch.Tensor, gan_loss: str) -> torch.Tensor:
    """The decoder's adversarial term from the critic's scores on reconstructions."""
    if gan_loss == "ns-r1":
        return F.softplus(-fake_scores.float()).mean()
    return -fake_scores.float().mean()  # wgan-gp and hinge (LDM) alike


def _input_grad(scores: torch.Tensor, x: torch.Tensor, grad_scale) -> torch.Tensor:
    """d sum_i D(x_i) / d x in fp32, kept differentiable. Under fp16 the backward through the
    critic underflows (D is a mean over ~900 patch scores): it runs on ``grad_scale`` x the
    scores (the critic's loss scale) and is unscaled here, in fp32, as PyTorch's AMP notes do."""
    (grad,) = torch.autograd.grad(scores.float().flatten(1).mean(1).sum() * grad_scale, x, create_graph=True)
    return grad.float() / grad_scale


def functional_input_grad(critic: nn.Module, x: torch.Tensor, grad_scale=1.0) -> torch.Tensor:
    """``_input_grad`` by ``torch.func.grad``: the same gradient, still differentiable in the
    critic's weights, but traceable, so ``torch.compile`` can compile the penalty's double
    backward (``speed.Tuning.compile_penalty``); ``autograd.grad(create_graph=True)`` cannot be."""
    params = dict(critic.named_parameters())

    def total(v, buffers):  # buffers as inputs: batch norm updates its running statistics in place
        return torch.func.functional_call(critic, (params, buffers), (v,)).float().flatten(1).mean(1).sum() * grad_scale

    return torch.func.grad(total)(x, dict(critic.named_buffers())).float() / grad_scale


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor,
                     grad_scale=1.0, functional: bool = False) -> torch.Tensor:
    """WGAN-GP: mean_i (||grad D(x_i)||_2 - 1)^2 at x_i = real_i + alpha_i (fake_i - real_i).

    ``alpha`` is (N, 1, 1, 1) in [0, 1]; D(x_i) is the mean of sample i's score map, and the
    norm is taken per sample over C*H*W. ``grad_scale``: see ``_input_grad`` (1 unless fp16).
    ``functional``: the inner gradient by ``functional_input_grad`` (the same maths; compilable).
    """
    x = (real + alpha * (fake - real)).detach()
    if functional:
        grad = functional_input_grad(critic, x, grad_scale)
    else:
        x.requires_grad_(True)
        # critic sees a view of the leaf: module hooks (FlopCounterMode's) reject leaf inputs here
        grad = _input_grad(critic(x.view_as(x)), x, grad_scale)
    return (grad.flatten(1).norm(dim=1) - 1.0).pow(2).mean()


def r1_penalty(critic: nn.Module, real: torch.Tensor, grad_scale=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """R1: mean_i ||grad D(real_i)||^2 (D per sample as above); also returns the real scores."""
    x = real.detach().requires_grad_(True)
    scores = critic(x.view_as(x))
    grad = _input_grad(scores, x, grad_scale)
    return grad.flatten(1).pow(2).sum(1).mean(), scores


def critic_loss(critic, real, fake, gan_loss: str, gp_weight=10.0, r1_gamma=10.0, drift_weight=0.0,
                generator: torch.Generator | None = None, scores=None, grad_scale=1.0,
                penalty=None) -> tuple[torch.Tensor, dict]:
    """The critic's loss on prepared ``real`` and (detached) ``fake`` batches, and its logs.

    ``scores``: the same critic for the first-order passes (e.g. ``torch.compile(critic)``); the
    penalties' double backward runs ``critic`` itself. ``penalty``: ``gradient_penalty`` or a
    function with its signature (e.g. its compiled functional form, ``speed.compiled_penalty``).
    ``grad_scale``: the fp16 loss scale for the penalties' inner backward (a float or 0-dim
    tensor; 1 in fp32/bf16).
    """
    scores = critic if scores is None else scores
    penalty = gradient_penalty if penalty is None else penalty
    if gan_loss not in GAN_LOSSES:
        raise ValueError(f"gan_loss must be one of {GAN_LOSSES}, got {gan_loss!r}")
    fake = fake.detach()
    logs = {}
    if gan_loss == "ns-r1":
        r1, real_scores = r1_penalty(critic, real, grad_scale)
        fake_scores = scores(fake).float()
        loss = F.softplus(-real_scores.float()).mean() + F.softplus(fake_scores).mean() + 0.5 * r1_gamma * r1
        logs["critic/r1"] = r1.detach()
    else:
        real_scores, fake_scores = scores(real).float(), scores(fake).float()
    if gan_loss == "hinge":
        loss = 0.5 * (F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean())
    elif gan_loss == "wgan-gp":
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=generator, dtype=real.dtype)
        gp = penalty(critic, real, fake, alpha, grad_scale)
        loss = fake_scores.mean() - real_scores.mean() + gp_weight * gp
        if drift_weight:
            loss = loss + drift_weight * real_scores.flatten(1).mean(1).pow(2).mean()
        logs["critic/gp"] = gp.detach()
    logs.update({"critic/loss": loss.detach(), "critic/real": real_scores.mean().detach(),
                 "critic/fake": fake_scores.mean().detach()})
    return loss, logs
