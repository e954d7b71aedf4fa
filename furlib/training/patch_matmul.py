"""Two convolutions as one matrix product over shifted views of a map: where cuDNN's kernel is
slow for the shape and a plain matrix product is not (speed levers, ``speed.Tuning``). The same
sums in another order: ``tests/test_speed.py`` compares values and gradients with the convs.

1. ``PatchMatmulConv``: the critic's first conv (3 -> 64 channels, 4x4, stride 2) as the product
   of each output pixel's 48 input values (``conv_patches``) with the weight. WGAN-GP
   differentiates the critic's input gradient in its weights; for a conv, PyTorch's double
   backward computes that weight gradient as a forward convolution of the transposed tensors
   with the whole output map as its kernel: at batch 32, 256 px, a 128x128 kernel that cuDNN ran
   in one slow kernel, 5.4 ms a step on an H100 (benchmarks/RESULTS.md, issue 21). Through a
   matrix product, every derivative, the double backward's too, is a matrix product, and the
   patches' gradient a sum of strided slices that a compiled graph fuses.
2. ``shifted_weight_grads``: the adaptive weight's two last-layer weight gradients (6 outputs,
   128 channels, 3x3 at 256 px). For a stride-1 conv,
       dW[o, c, i, j] = sum over pixels p of g_ij[p, o] * f[p, c]
   where g_ij is the output gradient shifted by the tap (i, j): the nine shifted copies of the
   small gradient maps, side by side, times the features read once as a (pixels x channels)
   matrix (a view of channels-last memory). cuDNN's weight-gradient kernel for 6 outputs took
   2.7 ms a step, plus ~1 ms of layout changes.

Both keep the dtype rules of the conv they replace: autocast casts a matrix product as it casts
a conv; the last-layer gradients stay fp32 (TF32 where the caller allows it, as before).
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


def shifted_weight_grads(features: torch.Tensor, grad_out: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """d loss / d ``conv.weight`` from the conv's input ``features`` (N, C, H, W) and the loss's
    gradient at its output ``grad_out`` (N, O', H', W', any O'), for a stride-1 conv without
    dilation or groups: (O', C, kh, kw), in ``grad_out``'s dtype."""
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    n, c, h, w = features.shape
    # g_ij[y, x] = grad_out[y + ph - i, x + pw - j], zero outside: pad so every tap is a slice
    top, left = max(kh - 1 - ph, 0), max(kw - 1 - pw, 0)
    bottom, right = max(h + ph - grad_out.shape[2], 0), max(w + pw - grad_out.shape[3], 0)
    g = F.pad(grad_out, (left, right, top, bottom)).permute(0, 2, 3, 1)  # NHWC
    taps = [g[:, ph - i + top:ph - i + top + h, pw - j + left:pw - j + left + w] for i in range(kh) for j in range(kw)]
    shifted = torch.stack(taps, 3).reshape(n * h * w, -1)  # (pixels, kh * kw * O')
    f = features.to(grad_out.dtype).permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view if channels-last
    return (shifted.t() @ f).view(kh, kw, -1, c).permute(2, 3, 0, 1)
