"""The critic's first conv (3 -> 64 channels, 4x4, stride 2) as one matrix product: each output
pixel's 48 input values (``conv_patches``) times the weight (a speed lever, ``speed.Tuning``).

Why: WGAN-GP differentiates the critic's input gradient in its weights. For a conv, PyTorch's
double backward computes that weight gradient as a forward convolution of the transposed tensors
with the whole output map as its kernel: at batch 32, 256 px, a 128x128 kernel over 32 channels
that cuDNN ran in one slow kernel, 5.3 ms a step on an H100 (benchmarks/RESULTS.md, issue 21).
Through a matrix product every derivative, the double backward's too, is a matrix product, and
the patches' gradient a sum of strided slices that a compiled graph fuses. Deeper convs keep
cuDNN: their patches would be 16x their input, and their double-backward kernels are small.

The same sums in another order: ``tests/test_patch_matmul.py`` compares values and the
penalty's gradients with the conv. Autocast casts the product as it casts a conv.
"""

import torch
import torch.nn.functional as F
from torch import nn


def conv_patches(x: torch.Tensor, kernel: tuple, stride: tuple, padding: tuple) -> torch.Tensor:
    """(N, C, H, W) -> (N, Ho, Wo, C * kh * kw): each output pixel's input patch (zero padded),
    ordered (c, i, j) as a conv weight's (O, C, kh, kw) flattens."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    x = F.pad(x, (pw, pw, ph, ph))
    ho, wo = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    taps = [x[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] for i in range(kh) for j in range(kw)]
    return torch.stack(taps, -1).permute(0, 2, 3, 1, 4).flatten(3)


class PatchMatmulConv(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys, zero padding, no dilation or groups)
    computed as ``conv_patches(x) @ weight``; the output is NCHW over channels-last memory."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = conv_patches(x, self.kernel_size, self.stride, self.padding)
        y = cols @ self.weight.flatten(1).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)  # as autocast casts a conv's bias
        return y.permute(0, 3, 1, 2)


def use_patch_matmul(critic: nn.Module) -> int:
    """The critic's convs that read RGB (3 channels; its first) as ``PatchMatmulConv``, in place;
    returns how many. Deeper convs keep cuDNN: their patches would be 16x their input."""
    swapped = 0
    for module in critic.modules():
        if (type(module) is nn.Conv2d and module.in_channels == 3 and module.groups == 1
                and module.dilation == (1, 1) and module.padding_mode == "zeros"):
            module.__class__ = PatchMatmulConv
            swapped += 1
    return swapped

