"""Speed levers: same maths, faster. Nothing here changes what a step computes.

``tests/test_train.py`` and ``tests/test_speed.py`` compare each lever with the plain path
(losses and gradients). Three levers, each its own section below:

1. ``speed_up``: memory layout (NHWC), phase upsampling, ``torch.compile``; ``Tuning`` holds the
   levers a benchmark or test may change that are not recipe parameters (02 never sets them, so a
   run's record does not need them): among them the compiled gradient penalty
   (``compiled_penalty``) and pixel terms, the attention as matrix products
   (``use_math_attention``), group norms with per-channel statistics
   (``furlib.training.group_norm``) and the critic's first conv as a matrix product
   (``furlib.training.patch_matmul``), each on by default since measured on a GPU
   (benchmarks/RESULTS.md, issue 21), as are the decoder's norm + SiLU pairs with a Triton
   backward (``furlib.training.norm_silu``). The 02 parameter
   ``compile_cache_dir`` keeps compiled kernels in a folder (``use_compile_cache``).
2. Phase upsampling (``use_phase_upsampling``): the decoder's "nearest 2x upsample, then 3x3 conv"
   as four 2x2 convs at the low resolution.
3. Gradient averaging over processes by hand (``average_gradients``, ``check_in_sync``).

## Phase upsampling
The decoder's "nearest 2x upsample, then 3x3 conv" as four 2x2 convs at the low resolution.

Every output pixel (2i+a, 2j+b) of a 3x3 conv over a nearest-upsampled map reads only a 2x2
neighbourhood of the *input* map: along each axis the three taps fall on two input rows, for
phase a=0 rows (i-1, i) with kernel rows (w0, w1+w2), for a=1 rows (i, i+1) with (w0+w1, w2).
So the same function is one conv with 4x the output channels and a 2x2 kernel on the small map,
then an interleave of the four phases: 16 instead of 36 multiply-adds per output and input
channel (2.25x fewer), in the forward and both backward convs. The three upsampling convs of the
SD decoder are 28% of its FLOPs. The checkpoint still holds the 3x3 weights; the 2x2 kernels are
rebuilt from them (differentiably) at every call, so gradients land on the original parameter.
The same sums are also one stride-2 transposed conv with a 4x4 kernel (``transposed_kernels``):
cuDNN then writes the output interleaved, with no phase stack in the forward or strided scatter in
the backward (``Tuning.transposed_upsample``, the default: 3.4-3.7 ms a step less on an H100).

Same maths, different rounding (sums of weights first): ``tests/test_train.py`` compares outputs
and gradients with diffusers' ``Upsample2D``.

## Gradient averaging
Several processes, one run: gradients averaged by hand, and a check that ranks agree.

Why not ``DistributedDataParallel`` (or accelerate's ``prepare``, which wraps the model in it):
- the step differentiates at the reconstruction with ``torch.autograd.grad`` (the adaptive
  weight's fast path, ``furlib.training.trainer``); DDP's reducer only handles gradients that
  backward accumulates into ``.grad`` and documents that ``autograd.grad`` does not work with it;
- the critic runs three ways a step (the decoder's term, its own loss, the gradient penalty's
  double backward): a DDP-wrapped critic would expect one reduction per forward;
- two models with their own optimizers, scalers and skip decisions: every rank must take the
  same skip-or-step decision, so the loss is averaged along with the gradients.
One flat all-reduce after all micro-batches does all of this (one call a step; ``grad_accum``
needs no ``no_sync``). What it gives up: DDP overlaps the reduction with the backward; here it
runs after it (one decoder's and one critic's gradients a step).
"""

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from furlib.perceptual import use_fp16_trunk
from furlib.training import norm_silu
from furlib.training.group_norm import use_channel_stats_group_norm
from furlib.training.losses import gradient_penalty, pixel_errors
from furlib.training.patch_matmul import use_patch_matmul

# Inductor's NHWC conversion, forced: left to its heuristic, the backward graph mixes layouts and
# cuDNN's convolution_backward copies ~0.5 GB activations to match them (~40 ms a step at 256 px,
# batch 32 on an H100); forced on an NCHW model: 273 -> 231 ms (benchmarks/RESULTS.md).
COMPILE_OPTIONS = {"force_layout_optimization": True}


# The VAE's attention as matrix products on CUDA for crops up to this many latent tokens (512 px):
# the score matrix is batch x tokens^2 in fp32 (diffusers upcasts the softmax), 0.5 GB at batch 8
MATH_ATTENTION_TOKENS = 64 * 64


@dataclasses.dataclass
class Tuning:
    """Levers a benchmark or test may change; the defaults are what 02 runs. Each was measured
    side by side on a GPU before it became a default (benchmarks/RESULTS.md, issue 21)."""
    inductor_options: dict = dataclasses.field(default_factory=lambda: dict(COMPILE_OPTIONS))
    compile_critic: bool = True     # a compiled twin for the critic's first-order passes
    compile_penalty: bool = True    # WGAN-GP's double backward compiled (``compiled_penalty``); same maths
    lpips_autocast: bool = False    # LPIPS under the step's autocast, not fp32 (changes results)
    math_attention: bool = True     # on CUDA, crops up to 512 px: ``use_math_attention``
    tap_detached: bool = True       # the adaptive weight's features kept without a graph (``FeatureTap``)
    channel_stats_norm: bool = True  # compiled CUDA: the VAE's group norms as ``group_norm.ChannelStatsGroupNorm``
    critic_patch_matmul: bool = True  # compiled CUDA: the critic's RGB conv as ``patch_matmul.PatchMatmulConv``
    compile_pixel_terms: bool = True  # compiled runs: the Oklab L1/L2 terms compiled (``losses.pixel_errors``)
    transposed_upsample: bool = True  # phase upsampling as one stride-2 transposed conv (``upsample_conv_transposed``)
    last_layer_bf16: bool = False  # the adaptive weight's last-layer gradients in bf16 (``losses.last_layer_grads``):
                                   # -1.8 ms, but its error is 6x TF32's (RESULTS, issue 21), so off
    fused_norm_silu: bool = True  # compiled CUDA: the decoder's norm + SiLU pairs, Triton backward (``norm_silu``)
    lpips_fp16: bool = True  # compiled CUDA: LPIPS's trunk in fp16 on a scaled loss (``perceptual.HalfTrunk``;
                             # fp16 steps: their loss scale): -8.5 ms; its gradient as far from fp32's
                             # as TF32's (RESULTS, issue 21)
    part_timer: Callable[[str], AbstractContextManager] | None = None  # wraps each part of the step


def use_compile_cache(folder=None) -> Path | None:
    """Keep inductor's and Triton's compiled kernels in ``folder`` (made if missing; None: torch's
    default, ``/tmp/torchinductor_<user>``, which survives a kernel restart, not a new machine), for
    this process and the compile workers it starts; call before the first compile. A later process
    that compiles the same graphs (the same model, shapes, settings and torch) loads them instead
    of building them: a Colab runtime that was restarted, or recycled when ``folder`` is on Drive.
    Dynamo's tracing runs every time.

    AOTAutograd's cache (the traced forward and backward graphs) skips, by default, any graph that
    holds an ``autograd.Function``: the decoder's fused norms (``norm_silu``) and the Oklab cube root
    (``oklab``) hold one, so a warm start traced them again: step 0 took 27-29 s on an H100, 16 s
    with them cached (RESULTS, issue 21).
    PyTorch's flag ``autograd_cache_allow_custom_autograd_functions`` (torch >= 2.7) lets them in:
    the graph records the function's traced forward and backward, so the cache key covers them.
    Ours are pure (no state but their saved tensors); ``tests/test_speed.py`` sees the hit."""
    import torch._functorch.config as functorch
    import torch._inductor.config as inductor

    if hasattr(functorch, "autograd_cache_allow_custom_autograd_functions"):
        functorch.autograd_cache_allow_custom_autograd_functions = True
    inductor.fx_graph_cache = True  # the default since torch 2.5; requirements allow 2.4
    if folder is None:
        return None
    folder = Path(folder).expanduser().resolve()
    (folder / "triton").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    return folder


def wants_math_attention(tuning: Tuning, settings, device: torch.device) -> bool:
    """``Tuning.math_attention`` applies on CUDA (where it was measured) up to 512 px crops."""
    tokens = (settings.resolution // 8) ** 2
    return tuning.math_attention and torch.device(device).type == "cuda" and tokens <= MATH_ATTENTION_TOKENS


def use_math_attention(vae) -> None:
    """The VAE's self-attention as batched matrix products and a softmax (diffusers' classic
    ``AttnProcessor``) instead of ``scaled_dot_product_attention``. Its one head is 512 wide (SD,
    SDXL) and fused kernels stop at 256: PyTorch then takes its memory-efficient kernel, whose
    backward for this width ran at ~27 TFLOP/s on an H100 (6.4 ms a step at 256 px, batch 32;
    benchmarks/RESULTS.md). The score matrix (batch x tokens^2) is small at training crops.
    Same maths, different rounding; the weights and state-dict keys do not change."""
    from diffusers.models.attention_processor import AttnProcessor

    vae.set_attn_processor(AttnProcessor())


def compiled_penalty(options: dict):
    """``losses.gradient_penalty`` with its inner gradient by ``torch.func`` (``functional=True``),
    compiled: inductor fuses the double backward through the critic's layer norms and LReLUs that
    otherwise runs eagerly, op by op. The same function; rounding may differ (tests compare)."""
    return torch.compile(functools.partial(gradient_penalty, functional=True), options=options)


def speed_up(vae, critic, rec_loss, settings, device: torch.device, tuning: Tuning):
    """Layout, phase upsampling and compilation, in place; returns (memory layout, the critic
    for first-order passes, the gradient penalty function or None for the plain one)."""
    compiled = settings.uses("torch_compile", device)
    if compiled:
        use_compile_cache(settings.compile_cache_dir or None)
    if settings.uses("phase_upsample", device):
        use_phase_upsampling(vae.decoder, tuning.transposed_upsample)  # keeps the state-dict keys
    if wants_math_attention(tuning, settings, device):
        use_math_attention(vae)
    if compiled and torch.device(device).type == "cuda":  # levers measured on CUDA only
        if tuning.channel_stats_norm:
            use_channel_stats_group_norm(vae)
        lacking = norm_silu.missing() if tuning.fused_norm_silu else ""
        if lacking:  # the unfused norms: same maths, slower
            warnings.warn(f"Tuning.fused_norm_silu is off: this install lacks {lacking}")
        elif tuning.fused_norm_silu:  # the decoder's only: the frozen encoder has no backward
            norm_silu.load_kernel()  # before compiling, so the traced backward finds its op
            norm_silu.use_fused_norm_silu(vae.decoder)
        if tuning.critic_patch_matmul:
            use_patch_matmul(critic)
        if tuning.lpips_fp16 and rec_loss.lpips is not None:
            use_fp16_trunk(rec_loss.lpips)
    # compiled graphs choose their own layouts (see COMPILE_OPTIONS): "auto" NHWC is for eager
    nhwc = settings.channels_last == "yes" or (
        settings.channels_last == "auto" and not compiled and device.type == "cuda")
    layout = torch.channels_last if nhwc else torch.contiguous_format
    for module in (vae, critic, rec_loss):
        module.to(memory_format=layout)
    scores, penalty = critic, None
    if compiled:
        # in place, so state-dict keys and the feature hook stay
        for module in (vae.encoder, vae.decoder, rec_loss.lpips):
            if module is not None:
                module.compile(options=tuning.inductor_options)
        if tuning.compile_critic:
            # a compiled twin sharing the weights: the penalty's double backward runs the eager
            # critic (autograd.grad with create_graph does not compile), or compile_penalty's form
            scores = torch.compile(critic, options=tuning.inductor_options)
        if tuning.compile_penalty:
            penalty = compiled_penalty(tuning.inductor_options)
        if tuning.compile_pixel_terms:
            rec_loss.pixel_errors = torch.compile(pixel_errors, options=tuning.inductor_options)
    return layout, scores, penalty



def _fold(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernels along ``dim`` (size 3 -> 2) for the even and the odd output phase."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3) -> (4 * O, C, 2, 2), phases ordered (a, b) = (0, 0), (0, 1), (1, 0), (1, 1)."""
    rows = _fold(weight, 2)
    return torch.cat([k for r in rows for k in _fold(r, 3)])


def transposed_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3) -> (C, O, 4, 4) for ``conv_transpose2d`` at stride 2, padding 1: output row
    2i + a reads input rows (i - 1, i) for a = 0 and (i, i + 1) for a = 1, and the transposed
    conv's tap k puts input row i at output row 2i + k - 1, so along each axis the taps are
    (w2, w1 + w2, w0 + w1, w0): the phase kernels of ``_fold``, interleaved."""
    def taps(w, dim):
        w0, w1, w2 = w.unbind(dim)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)

    return taps(taps(weight, 2), 3).transpose(0, 1)


def upsample_conv_transposed(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``upsample_conv`` as one stride-2 transposed conv: the same 16 multiply-adds per output,
    written interleaved by the convolution itself (no phase stack of the output map)."""
    return F.conv_transpose2d(x, transposed_kernels(conv.weight), conv.bias, stride=2, padding=1)


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, padding-1 ``conv``."""
    n, _, h, w = x.shape
    bias = None if conv.bias is None else conv.bias.repeat(4)
    # the kernels are summed in the weights' dtype (fp32); autocast casts them like conv's own
    out = F.conv2d(x, phase_kernels(conv.weight), bias, padding=1)  # (N, 4 O, h + 1, w + 1)
    # interleave in NHWC, channels innermost on both sides (a strided NCHW copy is ~5x slower);
    # an axis's even phase starts at offset 0, its odd one at 1
    phases = out.permute(0, 2, 3, 1).unflatten(3, (2, 2, -1))  # (N, h + 1, w + 1, a, b, O)
    rows = [torch.stack([phases[:, a:a + h, b:b + w, a, b] for b in (0, 1)], 3) for a in (0, 1)]
    y = torch.stack(rows, 2).reshape(n, 2 * h, 2 * w, -1).permute(0, 3, 1, 2)  # NCHW view of NHWC
    return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()


class PhaseUpsample(nn.Module):
    """Drop-in for a decoder ``Upsample2D``; keeps its ``conv`` (same state-dict keys)."""

    def __init__(self, conv: nn.Conv2d, transposed: bool = False):
        super().__init__()
        self.conv, self.transposed = conv, transposed

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        if output_size is not None:
            raise ValueError("PhaseUpsample doubles the size; an explicit output_size is not supported")
        return (upsample_conv_transposed if self.transposed else upsample_conv)(hidden_states, self.conv)


def _replaceable(module: nn.Module) -> bool:
    conv = getattr(module, "conv", None)
    return (type(module).__name__ == "Upsample2D" and module.use_conv and not module.use_conv_transpose
            and module.interpolate and module.norm is None and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1)


def use_phase_upsampling(decoder: nn.Module, transposed: bool = False) -> int:
    """Swap the decoder's plain nearest+3x3 ``Upsample2D`` layers in place; returns how many.
    ``transposed``: each as ``upsample_conv_transposed`` (``Tuning.transposed_upsample``)."""
    swapped = 0
    for block in getattr(decoder, "up_blocks", []):
        ups = getattr(block, "upsamplers", None) or []
        for i, up in enumerate(ups):
            if _replaceable(up):
                ups[i] = PhaseUpsample(up.conv, transposed)
                swapped += 1
    return swapped



def average_gradients(params: list, scalars: list, world_size: int) -> None:
    """Average the ``.grad`` of ``params`` and the 0-dim tensors ``scalars`` (in place) over all
    ranks with one all-reduce; a no-op on one process. Everything must be fp32 (one flat buffer)."""
    if world_size == 1:
        return
    average_tensors([p.grad for p in params if p.grad is not None] + [s.view(1) for s in scalars], world_size)


def average_tensors(tensors: list, world_size: int) -> None:
    """Average fp32 ``tensors`` in place over all ranks with one all-reduce (one copy in, one
    copy back); a no-op on one process. Also the adaptive weight's last-layer gradient sums."""
    if world_size == 1:
        return
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size
    for t, synced in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(synced.view_as(t))


def check_in_sync(tensors: list, rank: int, world_size: int, step: int) -> None:
    """Raise unless every rank holds the same ``tensors`` (a collective call; compares one
    float64 sum per tensor, which any real divergence changes)."""
    if world_size == 1:
        return
    import torch.distributed as dist

    mine = torch.stack([t.detach().double().sum() for t in tensors])
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    if not all(torch.equal(mine, other) for other in every):
        raise RuntimeError(f"rank {rank}: weights differ between ranks at step {step}")
