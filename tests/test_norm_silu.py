"""``norm_silu``: group norm + SiLU with its own backward (``Tuning.fused_norm_silu``). Its maths
in fp64 against ``nn.GroupNorm`` and ``F.silu``, its Triton kernel under Triton's interpreter
(on the CPU), its output under autocast, and the swap in a diffusers decoder."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from furlib.models import load_vae
from furlib.training.norm_silu import GroupNormSiLU, NormSiLUFunction, use_fused_norm_silu

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def norm_and_grads(fn, x, weight, bias, upstream):
    """fn's output and the gradients of (output * upstream).sum() at x, weight, bias."""
    x, weight, bias = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    out = fn(x, weight, bias)
    out.backward(upstream)
    return out.detach(), x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels,groups", [(8, 2), (12, 4)])
def test_norm_silu_is_group_norm_then_silu_in_fp64(channels, groups, layout):
    """Output and the gradients at x, weight and bias to fp64 rounding (the torch sums: CPU)."""
    gen = torch.Generator().manual_seed(channels)
    x = torch.randn(2, channels, 5, 7, generator=gen, dtype=torch.float64) * 3 + 2  # an offset: variance cancels
    x = x.contiguous(memory_format=LAYOUTS[layout])
    weight, bias = torch.randn(2, channels, generator=gen, dtype=torch.float64)
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    plain = norm_and_grads(lambda x, w, b: F.silu(F.group_norm(x, groups, w, b, 1e-6)), x, weight, bias, upstream)
    mine = norm_and_grads(lambda x, w, b: NormSiLUFunction.apply(x, w, b, groups, 1e-6), x, weight, bias, upstream)
    for name, a, b in zip(("out", "x", "weight", "bias"), plain, mine):
        assert (b - a).norm() <= 1e-12 * a.norm(), name


def test_norm_silu_passes_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    weight, bias = (torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda x, w, b: NormSiLUFunction.apply(x, w, b, 3, 1e-5), (x, weight, bias))


KERNEL_PROBE = """
import torch
import torch.nn.functional as F
from furlib.training import norm_silu
from furlib.training.group_norm import group_stats

kernel = norm_silu.load_kernel()
worst = 0.0
for tile in (kernel.TILE, 64):  # 64: BLOCK_P = 4, so an image's pixels span many programs
    kernel.TILE = tile
    for x_layout in (torch.channels_last, torch.contiguous_format):
        for g_layout in (torch.channels_last, torch.contiguous_format):
            for dtype in (torch.float32, torch.bfloat16):
                gen = torch.Generator().manual_seed(0)
                x = (torch.randn(2, 12, 9, 11, generator=gen) * 3 + 2).to(dtype).contiguous(memory_format=x_layout)
                g = torch.randn(x.shape, generator=gen).to(dtype).contiguous(memory_format=g_layout)
                weight, bias = torch.randn(2, 12, generator=gen)
                mean_g, rstd_g = group_stats(x.float(), 4, 1e-6)
                args = (x, g, mean_g, rstd_g, weight, bias)
                for ref, got in zip(norm_silu.torch_sums(*args), kernel.norm_silu_sums(*args)):
                    worst = max(worst, float((got - ref).norm() / ref.norm()))
print("kernel", worst)
# the whole backward (norm_silu.uses_triton: the kernel's sums) against fp64 autograd
gen = torch.Generator().manual_seed(1)
x = torch.randn(2, 12, 9, 11, generator=gen, dtype=torch.float64) * 3 + 2
x = x.contiguous(memory_format=torch.channels_last)
weight, bias = torch.randn(2, 12, generator=gen, dtype=torch.float64)
upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
grads = []
for dtype, fn in ((torch.float64, lambda x, w, b: F.silu(F.group_norm(x, 4, w, b, 1e-6))),
                  (torch.float32, lambda x, w, b: norm_silu.NormSiLUFunction.apply(x, w, b, 4, 1e-6))):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, weight, bias)]
    assert norm_silu.uses_triton(leaves[0]) == (dtype == torch.float32)
    fn(*leaves).backward(upstream.to(dtype))
    grads.append([t.grad.double() for t in leaves])
print("backward", max(float((b - a).norm() / a.norm()) for a, b in zip(*grads)))
"""


def test_triton_kernel_sums_under_the_interpreter():
    """The kernel's (s1, s2) equal the torch sums (fp32) for x and its gradient channels-last or
    not, bf16 or fp32, 12 channels (BLOCK_C 16: masked), one or many programs an image; and the
    backward with the kernel's sums equals fp64 autograd's. A subprocess: TRITON_INTERPRET must be
    set before triton is imported."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", KERNEL_PROBE], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    errors = dict(line.split() for line in out.stdout.strip().splitlines())
    assert float(errors["kernel"]) <= 1e-5, errors  # seen: 2e-7
    assert float(errors["backward"]) <= 1e-5, errors  # seen: 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_under_autocast_the_output_is_the_fp32_result_rounded_to_bf16(dtype):
    """The consumer is a conv that autocast runs in bf16: rounding inside gives its numbers; the
    gradient at x keeps x's dtype."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 8, 6, 5, generator=gen) * 3 + 2).to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(2, 8, generator=gen)
    fp32 = NormSiLUFunction.apply(x.float(), weight, bias, 2, 1e-6)
    assert fp32.dtype == torch.float32
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = NormSiLUFunction.apply(x, weight, bias, 2, 1e-6)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fp32.to(torch.bfloat16))
    out.backward(torch.ones_like(out))
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def decoder_run(decoder, z: torch.Tensor):
    """The decoder's output and its parameter gradients for a fixed weighting of the output."""
    decoder.zero_grad(set_to_none=True)
    out = decoder(z)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), torch.cat([p.grad.flatten() for p in decoder.parameters()])


def test_use_fused_norm_silu_in_a_decoder_keeps_keys_outputs_and_gradients():
    """Every resnet block's two norms swapped, not the last norm nor the attention's; the same
    state-dict keys, forward and parameter gradients (fp32)."""
    from diffusers.models.resnet import ResnetBlock2D

    plain = load_vae("tiny-random", seed=0).decoder
    fused = copy.deepcopy(plain)
    blocks = [m for m in fused.modules() if isinstance(m, ResnetBlock2D)]
    assert use_fused_norm_silu(fused) == 2 * len(blocks) > 0
    assert all(type(b.norm1) is type(b.norm2) is GroupNormSiLU and isinstance(b.nonlinearity, torch.nn.Identity)
               for b in blocks)
    assert type(fused.conv_norm_out) is torch.nn.GroupNorm and isinstance(fused.conv_act, torch.nn.SiLU)
    assert sum(type(m) is torch.nn.GroupNorm for m in fused.modules()) == 1 + len(fused.mid_block.attentions)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    z = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    (out, grads), (fast_out, fast_grads) = decoder_run(plain, z), decoder_run(fused, z)
    assert (fast_out - out).abs().max() <= 1e-5 * out.abs().max()
    assert (fast_grads - grads).norm() <= 1e-5 * grads.norm()


def test_without_triton_op_the_kernel_is_refused_clearly(monkeypatch):
    """requirements.txt allows torch 2.4; ``torch.library.triton_op`` came in 2.6: ``missing``
    names it, ``load_kernel`` refuses with it (``speed_up`` then warns and keeps the unfused norms)."""
    from furlib.training import norm_silu

    monkeypatch.delattr(torch.library, "triton_op")
    monkeypatch.setattr(norm_silu, "_kernel", None)
    assert "torch >= 2.6" in norm_silu.missing()
    with pytest.raises(RuntimeError, match="torch >= 2.6"):
        norm_silu.load_kernel()
