"""The critic: LDM's PatchGAN layout with a choosable norm, and the three GAN objectives.

Hand-written because no library provides it in this form. The critic reads ``rgb_m11`` NCHW
(or its Oklab transform, ``critic_input='oklab'``) and returns a patch map of scores
(N, 1, h, w): 30x30 for a 256 px input with 3 layers. A sample's score is the mean of its map.

Norms (``critic_norm``): ``layer`` (per sample over C,H,W with a per-channel affine: the
WGAN-GP drop-in for batch norm), ``channel`` (per pixel over C), ``batch`` (LDM's), ``none``.
Objectives (``gan_loss``): ``wgan-gp`` (Gulrajani et al.: lambda 10, per-sample interpolates
and norms, optional drift), ``hinge`` (LDM), ``ns-r1`` (non-saturating with R1 on reals).
"""

import torch
import torch.nn.functional as F
from torch import nn

from furlib.oklab import rgb_to_oklab

NORMS = ("layer", "channel", "batch", "none")
GAN_LOSSES = ("wgan-gp", "hinge", "ns-r1")
CRITIC_INPUTS = ("rgb", "oklab")


class ChannelNorm(nn.Module):
    """Layer norm over channels at every pixel (the public Furception-author critic's norm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm(kind: str, channels: int) -> nn.Module:
    return {"layer": lambda: nn.GroupNorm(1, channels), "channel": lambda: ChannelNorm(channels),
            "batch": lambda: nn.BatchNorm2d(channels), "none": nn.Identity}[kind]()


class PatchCritic(nn.Module):
    """conv k4 s2 + LReLU; (layers-1) x [conv k4 s2, norm, LReLU]; conv k4 s1, norm, LReLU; conv -> 1."""

    def __init__(self, layers: int = 3, channels: int = 64, norm: str = "layer", input_space: str = "rgb"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"critic_norm must be one of {NORMS}, got {norm!r}")
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


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: mean_i (||grad D(x_i)||_2 - 1)^2 at x_i = real_i + alpha_i (fake_i - real_i).

    ``alpha`` is (N, 1, 1, 1) in [0, 1]; D(x_i) is the mean of sample i's score map, and the
    norm is taken per sample over C*H*W.
    """
    x = (real + alpha * (fake - real)).detach().requires_grad_(True)
    # critic sees a view of the leaf: module hooks (FlopCounterMode's) reject leaf inputs here
    scores = critic(x.view_as(x)).float().flatten(1).mean(1)
    (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
    return (grad.float().flatten(1).norm(dim=1) - 1.0).pow(2).mean()


def r1_penalty(critic: nn.Module, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R1: mean_i ||grad D(real_i)||^2 (D per sample as above); also returns the real scores."""
    x = real.detach().requires_grad_(True)
    scores = critic(x.view_as(x))
    (grad,) = torch.autograd.grad(scores.float().flatten(1).mean(1).sum(), x, create_graph=True)
    return grad.float().flatten(1).pow(2).sum(1).mean(), scores


def critic_loss(critic, real, fake, gan_loss: str, gp_weight=10.0, r1_gamma=10.0, drift_weight=0.0,
                generator: torch.Generator | None = None, scores=None) -> tuple[torch.Tensor, dict]:
    """The critic's loss on prepared ``real`` and (detached) ``fake`` batches, and its logs.

    ``scores``: the same critic for the first-order passes (e.g. ``torch.compile(critic)``); the
    penalties' double backward always runs ``critic`` itself.
    """
    scores = critic if scores is None else scores
    if gan_loss not in GAN_LOSSES:
        raise ValueError(f"gan_loss must be one of {GAN_LOSSES}, got {gan_loss!r}")
    fake = fake.detach()
    logs = {}
    if gan_loss == "ns-r1":
        r1, real_scores = r1_penalty(critic, real)
        fake_scores = scores(fake).float()
        loss = F.softplus(-real_scores.float()).mean() + F.softplus(fake_scores).mean() + 0.5 * r1_gamma * r1
        logs["critic/r1"] = r1.detach()
    else:
        real_scores, fake_scores = scores(real).float(), scores(fake).float()
    if gan_loss == "hinge":
        loss = 0.5 * (F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean())
    elif gan_loss == "wgan-gp":
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=generator, dtype=real.dtype)
        gp = gradient_penalty(critic, real, fake, alpha)
        loss = fake_scores.mean() - real_scores.mean() + gp_weight * gp
        if drift_weight:
            loss = loss + drift_weight * real_scores.flatten(1).mean(1).pow(2).mean()
        logs["critic/gp"] = gp.detach()
    logs.update({"critic/loss": loss.detach(), "critic/real": real_scores.mean().detach(),
                 "critic/fake": fake_scores.mean().detach()})
    return loss, logs
