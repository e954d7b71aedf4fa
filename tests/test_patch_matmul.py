"""Issue 21's levers of the fourth session: the critic's first conv as a matrix product
(``furlib.training.patch_matmul``: the same sums, and the slow kernel of the penalty's double
backward gone) and the compiled pixel terms (``losses.pixel_errors``)."""

import copy
import functools
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from furlib.training import speed
from furlib.training.losses import PatchCritic, gradient_penalty, pixel_errors
from furlib.training.patch_matmul import PatchMatmulConv, conv_patches, use_patch_matmul


def penalty_grads(critic, fn, real, fake, alpha) -> torch.Tensor:
    gp = fn(critic, real, fake, alpha)
    grads = torch.autograd.grad(gp, list(critic.parameters()), allow_unused=True, materialize_grads=True)
    return torch.cat([g.flatten() for g in grads])


def test_patch_matmul_conv_is_the_critic_conv():
    """``PatchMatmulConv``: the critic's first conv's output and the penalty's critic gradients
    (through the double backward, autograd's and ``torch.func``'s) equal the conv's to fp64
    rounding; the state-dict keys stay; under autocast the output has the conv's dtype."""
    gen = torch.Generator().manual_seed(0)
    plain = PatchCritic(3, 16, "pixel_layer").double()
    mine = copy.deepcopy(plain)
    assert use_patch_matmul(mine) == 1 and type(mine.net[0]) is PatchMatmulConv  # only the RGB conv
    assert mine.state_dict().keys() == plain.state_dict().keys()
    real, fake = (torch.randn(4, 3, 64, 64, generator=gen, dtype=torch.float64) for _ in range(2))
    alpha = torch.rand(4, 1, 1, 1, generator=gen, dtype=torch.float64)
    assert (mine(real) - plain(real)).abs().max() <= 1e-12 * plain(real).abs().max()
    ref = penalty_grads(plain, gradient_penalty, real, fake, alpha)
    for fn in (gradient_penalty, functools.partial(gradient_penalty, functional=True)):
        assert (penalty_grads(mine, fn, real, fake, alpha) - ref).norm() <= 1e-12 * ref.norm()
    conv = nn.Conv2d(3, 8, 3, 1, 1)
    fast = copy.deepcopy(conv)
    fast.__class__ = PatchMatmulConv
    x = torch.randn(2, 3, 10, 10, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x).dtype == conv(x).dtype == torch.bfloat16
    # patches: (N, Ho, Wo, C * kh * kw), against torch's own unfold
    cols = conv_patches(x, (3, 2), (2, 1), (1, 0))
    unfolded = F.unfold(x, (3, 2), stride=(2, 1), padding=(1, 0))  # (N, C * kh * kw, Ho * Wo)
    assert torch.equal(cols.flatten(1, 2), unfolded.transpose(1, 2))


def whole_map_kernels(swap: bool) -> list:
    """Kernel sizes of every convolution in the compiled penalty's forward and backward graphs."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    sizes = []

    def grab(gm, _):
        sizes.extend(tuple(n.args[1].meta["val"].shape[2:]) for n in gm.graph.nodes
                     if n.op == "call_function" and n.target == torch.ops.aten.convolution.default)
        return make_boxed_func(gm)

    torch._dynamo.reset()
    torch.manual_seed(0)
    critic = PatchCritic(2, 8, "pixel_layer")
    if swap:
        use_patch_matmul(critic)
    penalty = torch.compile(functools.partial(gradient_penalty, functional=True),
                            backend=aot_autograd(fw_compiler=grab, bw_compiler=grab))
    penalty(critic, torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32), torch.rand(2, 1, 1, 1)).backward()
    return sizes


def test_penalty_double_backward_has_no_whole_map_kernel():
    """The plain first conv's weight gradient in the double backward is a convolution whose kernel
    is the conv's whole 16x16 output map (32 px input); through the matrix product it is gone."""
    assert (16, 16) in whole_map_kernels(False)
    assert max(whole_map_kernels(True)) < (16, 16)


@pytest.mark.skipif(not shutil.which("g++") and not shutil.which("c++"),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_pixel_terms_are_the_pixel_terms():
    """``Tuning.compile_pixel_terms``: the Oklab L1/L2 terms and their gradient, compiled, equal
    the eager ones (fp32)."""
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    recon = (target + 0.1 * torch.randn(target.shape, generator=gen)).requires_grad_(True)
    compiled = torch.compile(pixel_errors, options=speed.COMPILE_OPTIONS)
    runs = []
    for fn in (pixel_errors, compiled):
        mae, mse = fn(recon, target, "oklab")
        runs.append((mae.detach(), mse.detach(), torch.autograd.grad(mae + 3 * mse, recon)[0]))
    for a, b in zip(*runs):
        assert (b - a).abs().max() <= 1e-5 * a.abs().max()
