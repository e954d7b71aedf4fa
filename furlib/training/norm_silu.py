"""Group norm then SiLU as one function with its own backward: the decoder's resnet blocks'
``silu(norm(x))`` pairs, for a compiled NHWC step (a speed lever, ``speed.Tuning.fused_norm_silu``).

Why: the backward of ``silu(group_norm(x))`` needs, per (image, channel), sums over the pixels.
Inductor's reduction kernels for them read channels-last memory with the pixels strided by C, at
about 40% of an H100's bandwidth (~6-7 ms a step at 256 px, batch 32). A hand-written Triton
kernel (``norm_silu_triton``) reads [pixels, channels] tiles, the channels contiguous in NHWC, and
sums over pixels; everything else stays torch ops that inductor fuses. On an H100 (2026-12-06,
benchmarks/RESULTS.md): the sums at 32 x 128 x 256 x 256 bf16 take 461 us (inductor's compile of
the same torch ops: 1560 us; in the step its fused reduction took 777 us), and the step at
256 px x 32 went from 193.5 and 192.5 ms to 181.3 and 181.1 ms. On by default for compiled CUDA
steps. The saved activation is the bf16 input alone, and the output leaves in bf16 (below).

The maths, per image n, group of M = pixels x group channels values, with fp32 statistics taken
as ``group_norm.ChannelStatsGroupNorm`` takes them:

    xhat = (x - mean_g) * rstd_g,  y = xhat * w + b,  out = silu(y)
    dy   = g * sig(y) * (1 + y * (1 - sig(y)))          (g: the gradient of out)
    s1   = sum over pixels of dy,  s2 = sum over pixels of dy * xhat     (per image and channel)
    dbias = sum over images of s1,  dweight = sum over images of s2
    dx   = rstd_g * (w dy - mean_group(w dy) - xhat * mean_group(w dy xhat))

where mean_group(w dy) = sum over the group's channels of w s1 / M (likewise with s2): the layer
norm backward, as d xhat_i / d x_j = rstd (delta_ij - 1/M - xhat_i xhat_j / M), eps included.
``tests/test_norm_silu.py`` checks it in fp64 against ``nn.GroupNorm`` and ``F.silu``.

Output dtype: the autocast dtype when autocast is on for x's device (the next op is always a conv,
which autocast would cast to it anyway; so the backward gets a bf16 gradient, not an fp32 one),
else x's. x: (n, c, *spatial), any memory format; statistics and y in fp32 (fp64 for fp64 x).
"""

import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from furlib.training.group_norm import ChannelStatsGroupNorm, group_stats, per_channel, scale_shift

# Triton's interpreter runs the kernel on CPU tensors (it must be set before triton is imported)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_kernel = None  # the module norm_silu_triton once imported (load_kernel)


def missing() -> str:
    """What this install lacks for the kernel ("" when nothing): Triton, and torch >= 2.6 for
    ``torch.library.triton_op`` (requirements.txt allows torch 2.4)."""
    if not hasattr(torch.library, "triton_op"):
        return f"torch.library.triton_op (torch >= 2.6; this is {torch.__version__})"
    return "" if importlib.util.find_spec("triton") else "Triton"


def load_kernel():
    """Import the Triton kernel, registering its op; before compiling, so that a traced backward
    finds it loaded. Raises a clear error where it cannot run (``missing``)."""
    global _kernel
    if _kernel is None:
        lacking = missing()
        if lacking:
            raise RuntimeError(f"Tuning.fused_norm_silu needs {lacking} for the backward's kernel; "
                               "set fused_norm_silu=False")
        from furlib.training import norm_silu_triton
        _kernel = norm_silu_triton
    return _kernel


def uses_triton(x: torch.Tensor) -> bool:
    """The kernel on CUDA (and on CPU under Triton's interpreter); torch ops otherwise and in fp64."""
    return x.dtype != torch.float64 and (x.is_cuda or INTERPRET)


def out_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _channels(per_channel_values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(n or 1, c) -> broadcastable against x (n, c, *spatial)."""
    return per_channel_values.reshape(*per_channel_values.shape, *(1,) * (x.dim() - 2))


def normalized(x, mean_g, rstd_g, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """(xhat, y = xhat * w + b), in the statistics' dtype, shaped like x."""
    c = x.shape[1]
    xhat = (x.to(mean_g.dtype) - _channels(per_channel(mean_g, c), x)) * _channels(per_channel(rstd_g, c), x)
    w, b = (_channels(p.to(mean_g.dtype).view(1, c), x) for p in (weight, bias))
    return xhat, xhat * w + b


def silu_grad(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g times silu'(y)."""
    sig = torch.sigmoid(y)
    return g.to(y.dtype) * sig * (1 + y * (1 - sig))


def torch_sums(x, g, mean_g, rstd_g, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """(s1, s2) of the module docstring, each (n, c), by torch ops: the reference path."""
    xhat, y = normalized(x, mean_g, rstd_g, weight, bias)
    dy, pixels = silu_grad(g, y), tuple(range(2, x.dim()))
    return dy.sum(pixels), (dy * xhat).sum(pixels)


def channel_sums(x, g, mean_g, rstd_g, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """(s1, s2): the Triton kernel's where it runs (``uses_triton``), else ``torch_sums``."""
    if not uses_triton(x):
        return torch_sums(x, g, mean_g, rstd_g, weight, bias)
    sums = (_kernel or load_kernel()).norm_silu_sums(x, g, mean_g, rstd_g, weight, bias)
    return sums[0], sums[1]


def input_grad(x, g, mean_g, rstd_g, weight, bias, s1, s2) -> torch.Tensor:
    """dx of the module docstring, in x's dtype: pointwise given the sums (one fused kernel
    in a compiled graph)."""
    n, c, groups = x.shape[0], x.shape[1], mean_g.shape[1]
    w = weight.to(mean_g.dtype)
    count = math.prod(x.shape[2:]) * (c // groups)  # values a group holds
    mean_wdy = per_channel((w * s1).view(n, groups, -1).sum(2) / count, c)
    mean_wdy_xhat = per_channel((w * s2).view(n, groups, -1).sum(2) / count, c)
    xhat, y = normalized(x, mean_g, rstd_g, weight, bias)
    wdy = _channels(w.view(1, c), x) * silu_grad(g, y)
    dx = _channels(per_channel(rstd_g, c), x) * (wdy - _channels(mean_wdy, x) - xhat * _channels(mean_wdy_xhat, x))
    return dx.to(x.dtype)


class NormSiLUFunction(torch.autograd.Function):
    """``silu(group_norm(x, groups, weight, bias, eps))``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        mean_g, rstd_g = group_stats(xf, groups, eps)
        scale, shift = scale_shift(mean_g, rstd_g, x.shape[1], weight.to(xf.dtype), bias.to(xf.dtype))
        ctx.save_for_backward(x, weight, bias, mean_g, rstd_g)
        return F.silu(xf * _channels(scale, x) + _channels(shift, x)).to(out_dtype(x))

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, mean_g, rstd_g = ctx.saved_tensors
        s1, s2 = channel_sums(x, g, mean_g, rstd_g, weight, bias)
        dx = input_grad(x, g, mean_g, rstd_g, weight, bias, s1, s2) if ctx.needs_input_grad[0] else None
        return dx, s2.sum(0).to(weight.dtype), s1.sum(0).to(bias.dtype), None, None


class GroupNormSiLU(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) whose output is already SiLU'd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NormSiLUFunction.apply(x, self.weight, self.bias, self.num_groups, self.eps)


def _fusable(block: nn.Module) -> bool:
    """A diffusers ``ResnetBlock2D`` whose two norms are each followed by its SiLU and nothing
    else: no time embedding (whose SiLU is the same module), no "scale_shift" (which scales and
    shifts between norm2 and the SiLU). The VAE decoder's up blocks say "group": norm2 alone."""
    from diffusers.models.resnet import ResnetBlock2D

    norms = (block.norm1, block.norm2) if type(block) is ResnetBlock2D else ()
    return bool(norms) and type(block.nonlinearity) is nn.SiLU and block.time_emb_proj is None \
        and block.time_embedding_norm != "scale_shift" \
        and all(type(m) in (nn.GroupNorm, ChannelStatsGroupNorm) and m.affine
                and m.num_channels % m.num_groups == 0 for m in norms)


def use_fused_norm_silu(decoder: nn.Module) -> int:
    """Each resnet block's norm1 and norm2 in ``decoder`` as ``GroupNormSiLU``, its SiLU then an
    ``nn.Identity``, in place (the same parameters and keys); returns how many norms. The
    decoder's last norm and SiLU (``conv_norm_out``/``conv_act``: the adaptive weight's
    ``FeatureTap`` reads their output in fp32) and the attention's norms (no SiLU) stay."""
    swapped = 0
    for block in list(decoder.modules()):
        if _fusable(block):
            block.norm1.__class__ = block.norm2.__class__ = GroupNormSiLU
            block.nonlinearity = nn.Identity()
            swapped += 2
    return swapped
