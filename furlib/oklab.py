"""Differentiable sRGB -> Oklab (Björn Ottosson's matrices), hand-written on purpose.

Inputs are ``rgb_m11`` NCHW in [-1, 1]; outputs are Oklab NCHW with channels (L, a, b):
white -> (1, 0, 0), black -> (0, 0, 0). Decoders overshoot [-1, 1] a little, so both the sRGB
transfer and the cube root are extended as odd functions instead of clamped: a clamp would
zero the gradient exactly where a loss must pull values back. The transfer's linear segment is
written as ``c / 12.92`` (not ``sign(c) * |c| / 12.92``, whose derivative at exactly 0 is 0), so
black itself -- where bf16 decoders put many near-black pixels exactly -- gets the segment's
slope. The cube root's slope is infinite at 0; its backward uses the slope at ``CBRT_EPS``
there, so gradients stay finite.
"""

import torch

# M1: linear sRGB -> LMS; M2: cube-rooted LMS -> Lab (rows are output channels).
M1 = (
    (0.4122214708, 0.5363325363, 0.0514459929),
    (0.2119034982, 0.6806995451, 0.1073969566),
    (0.0883024619, 0.2817188376, 0.6299787005),
)
M2 = (
    (0.2104542553, 0.7936177850, -0.0040720468),
    (1.9779984951, -2.4285922050, 0.4505937099),
    (0.0259040371, 0.7827717662, -0.8086757660),
)
CBRT_EPS = 1e-6  # |x| below which the cube root's backward uses a finite slope


class _SafeCbrt(torch.autograd.Function):
    """Exact odd cube root forward; backward slope 1 / (3 max(|x|, eps)^(2/3))."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sign() * x.abs().pow(1.0 / 3.0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (3.0 * x.abs().clamp_min(CBRT_EPS).pow(2.0 / 3.0))


def safe_cbrt(x: torch.Tensor) -> torch.Tensor:
    return _SafeCbrt.apply(x)


def srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    """sRGB-encoded [0, 1] -> linear light, extended as an odd function outside [0, 1]."""
    a = c.abs()
    curve = ((a.clamp_min(0.04045) + 0.055) / 1.055).pow(2.4)
    return torch.where(a <= 0.04045, c / 12.92, c.sign() * curve)  # linear part: slope 1/12.92 at 0


def _mix(matrix, x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(matrix, dtype=x.dtype, device=x.device)
    with torch.autocast(x.device.type, enabled=False):  # colour maths stays in x's precision
        return torch.einsum("oc,nchw->nohw", m, x)


def rgb_to_oklab(rgb_m11: torch.Tensor) -> torch.Tensor:
    """[-1, 1] sRGB NCHW -> Oklab NCHW. Computed in at least fp32."""
    x = rgb_m11.float() if rgb_m11.dtype in (torch.float16, torch.bfloat16) else rgb_m11
    lms = _mix(M1, srgb_to_linear((x + 1.0) * 0.5))
    return _mix(M2, safe_cbrt(lms))

