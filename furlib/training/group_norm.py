"""Group norm with its statistics taken per channel first: the same function as ``nn.GroupNorm``,
written so that a compiled NHWC graph reads memory in order (a speed lever, ``speed.Tuning``).

A group's mean and variance follow exactly from its channels' (the law of total variance, every
channel holding the same number of values):

    mean_g = mean over the group's channels of mean_c
    var_g  = mean of var_c  +  mean of (mean_c - mean_g)^2

Why: in channels-last memory a group's 4 (or 8, 16) channels are a few bytes every 128-512
channels, so a reduction per (image, group) -- what ``native_group_norm`` and inductor's
lowering of it do -- reads scattered bytes: on an H100 the decoder's group-norm statistics ran at
about a quarter of the memory bandwidth (benchmarks/RESULTS.md, issue 21). Per channel, the
reduction runs over pixels with the channels contiguous beside each other, and its backward
(autograd's, through ``var_mean``) is per-channel sums and pointwise work alike.

Different rounding, same maths: ``tests/test_speed.py`` compares outputs and gradients with
``nn.GroupNorm``. Under autocast the output is fp32, as CUDA's autocast runs ``group_norm`` (CPU's
runs it in bf16): the lever is for compiled CUDA steps (``speed.speed_up``).
"""

import torch
from torch import nn


class ChannelStatsGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys); see the module docstring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        mean_g, rstd_g = group_stats(xf, self.num_groups, self.eps)
        affine = (self.weight.to(xf.dtype), self.bias.to(xf.dtype)) if self.affine else (None, None)
        scale, shift = scale_shift(mean_g, rstd_g, c, *affine)
        spatial = (1,) * (x.dim() - 2)
        y = xf * scale.view(n, c, *spatial) + shift.view(n, c, *spatial)
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


def group_stats(xf: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (image, group)'s mean and 1 / sqrt(var + eps), both (n, groups), from per-channel
    statistics of ``xf`` (n, c, *spatial), in its dtype (fp32 or fp64)."""
    n, c, g = xf.shape[0], xf.shape[1], groups
    var_c, mean_c = torch.var_mean(xf, dim=tuple(range(2, xf.dim())), correction=0)  # (n, c)
    mean_cg = mean_c.view(n, g, c // g)
    mean_g = mean_cg.mean(2, keepdim=True)
    var_g = var_c.view(n, g, c // g).mean(2, keepdim=True) + (mean_cg - mean_g).pow(2).mean(2, keepdim=True)
    return mean_g.squeeze(2), torch.rsqrt(var_g + eps).squeeze(2)


def per_channel(per_group: torch.Tensor, channels: int) -> torch.Tensor:
    """(n, groups) -> (n, channels): each channel takes its group's value."""
    n, groups = per_group.shape
    return per_group.unsqueeze(2).expand(n, groups, channels // groups).reshape(n, channels)


def scale_shift(mean_g: torch.Tensor, rstd_g: torch.Tensor, channels: int, weight=None, bias=None):
    """(scale, shift), each (n, channels), with norm(x) = x * scale + shift: the group statistics
    per channel, then the affine ``weight`` and ``bias`` (none: not affine)."""
    scale = per_channel(rstd_g, channels)
    shift = -per_channel(mean_g, channels) * scale
    if weight is not None:
        scale, shift = scale * weight, shift * weight + bias
    return scale, shift


def use_channel_stats_group_norm(model: nn.Module) -> int:
    """Every ``nn.GroupNorm`` in ``model`` computed as ``ChannelStatsGroupNorm``, in place (the
    same module objects and parameters: hooks and state-dict keys stay); returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.GroupNorm and module.num_channels % module.num_groups == 0:
            module.__class__ = ChannelStatsGroupNorm
            swapped += 1
    return swapped
