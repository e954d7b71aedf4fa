"""The Triton kernel of ``norm_silu``'s backward: per (image, channel) sums over the pixels of
dy and dy * xhat (the module docstring of ``norm_silu`` gives the maths), as the op
``torch.ops.furlib.norm_silu_sums`` that ``torch.compile`` traces into (``triton_op``).

Imported only when used (``norm_silu.load_kernel``): CPU installs of torch may lack Triton.
x and g are read as [n, pixels, c] through their strides: one layout or another, any spatial
rank that flattens to a view; fast for channels-last, where a [BLOCK_P, BLOCK_C] tile is BLOCK_P
runs of C contiguous values. Each program sums one chunk of one image's pixels in fp32 and
writes its partial sums; torch adds the chunks.
"""

import torch
import triton
import triton.language as tl

# benchmarks/norm_silu_kernel.py on an H100 (torch 2.11, Triton 3.6), NHWC bf16 x and gradient:
# 461 us at 32 x 128 x 256 x 256 (1.07 GB read, 2.3 TB/s), 872 us at 32 x 256 x 256 x 256.
TILE = 4096       # values in a [BLOCK_P, BLOCK_C] tile (fp32 accumulators: two of them in registers)
PROGRAMS = 1024   # programs to aim for over the grid: several per SM of an H100 (132)
NUM_WARPS = 4


@triton.jit
def _sums_kernel(x_ptr, g_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, out_ptr,
                 pixels, channels, per_group, chunk,
                 x_sn, x_sc, x_sp, g_sn, g_sc, g_sp,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, k = tl.program_id(0), tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < channels
    stat = n * (channels // per_group) + c // per_group  # (n, group) of each channel
    mean = tl.load(mean_ptr + stat, mask=c_ok, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + stat, mask=c_ok, other=0.0)[None, :]
    w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    b = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    n64, c64 = n.to(tl.int64), c.to(tl.int64)[None, :]  # offsets past 2^31 values at large crops
    x_at, g_at = x_ptr + n64 * x_sn + c64 * x_sc, g_ptr + n64 * g_sn + c64 * g_sc
    s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(k * chunk, k * chunk + chunk, BLOCK_P):  # chunk: a multiple of BLOCK_P
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < pixels)[:, None] & c_ok[None, :]
        p64 = p.to(tl.int64)[:, None]
        x = tl.load(x_at + p64 * x_sp, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_at + p64 * g_sp, mask=ok, other=0.0).to(tl.float32)  # 0 where masked: dy = 0
        xhat = (x - mean) * rstd
        y = xhat * w + b
        sig = tl.sigmoid(y)
        dy = g * sig * (1.0 + y * (1.0 - sig))
        s1 += dy
        s2 += dy * xhat
    out = out_ptr + (n * tl.num_programs(1) + k) * channels + c
    tl.store(out, tl.sum(s1, axis=0), mask=c_ok)
    tl.store(out + tl.num_programs(0) * tl.num_programs(1) * channels, tl.sum(s2, axis=0), mask=c_ok)


def _grid(n: int, c: int, pixels: int) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_C, pixels a program, programs an image)."""
    block_c = triton.next_power_of_2(c)
    block_p = max(1, TILE // block_c)
    chunks = max(1, min(triton.cdiv(pixels, block_p), triton.cdiv(PROGRAMS, n)))
    chunk = triton.cdiv(triton.cdiv(pixels, chunks), block_p) * block_p
    return block_p, block_c, chunk, triton.cdiv(pixels, chunk)


@torch.library.triton_op("furlib::norm_silu_sums", mutates_args=())
def norm_silu_sums(x: torch.Tensor, g: torch.Tensor, mean_g: torch.Tensor, rstd_g: torch.Tensor,
                   weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(2, n, c) fp32: s1 and s2 of ``norm_silu``. x, g: (n, c, *spatial); mean_g, rstd_g:
    (n, groups) fp32; weight, bias: (c,)."""
    n, c = x.shape[:2]
    xs, gs = x.flatten(2), g.flatten(2)  # (n, c, pixels): views for NCHW and NHWC alike
    block_p, block_c, chunk, chunks = _grid(n, c, xs.shape[2])
    partial = torch.empty(2, n, chunks, c, device=x.device, dtype=torch.float32)
    torch.library.wrap_triton(_sums_kernel)[(n, chunks)](
        xs, gs, mean_g.contiguous(), rstd_g.contiguous(), weight.contiguous(), bias.contiguous(), partial,
        xs.shape[2], c, c // mean_g.shape[1], chunk, *xs.stride(), *gs.stride(),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return partial.sum(2)
