"""The fused norm + SiLU backward's sums (``norm_silu``): the Triton kernel beside inductor.

    python benchmarks/norm_silu_kernel.py --out norm_silu_kernel.json     # CUDA only

Per (image, channel), the sums over the pixels of dy and dy * xhat (``norm_silu``'s docstring):
``norm_silu_triton.norm_silu_sums`` against the same sums written as torch ops
(``norm_silu.torch_sums``) and compiled by inductor, for the decoder's channels-last bf16 shapes
at 256 px x 32 (32 groups). Each is timed with CUDA events over repeated launches (median of
five rounds); GB/s counts the bytes of x and its gradient read once. The two results are compared
(relative difference of the sums; both accumulate in fp32, in different orders).
"""

import argparse
import statistics

import torch

from furlib.runinfo import print_and_save
from furlib.training import norm_silu
from furlib.training.group_norm import group_stats

# the decoder's group norms followed by a SiLU at 256 px, batch 32: (channels, pixels a side)
SHAPES = [(128, 256), (256, 256), (256, 128), (512, 64)]


def gpu_ms(fn, repeats: int) -> float:
    """Median over five rounds of the GPU time per call, ms."""
    rounds = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) / repeats)
    return statistics.median(rounds)


def one_shape(batch: int, channels: int, side: int, groups: int, repeats: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(channels + side)
    shape = (batch, channels, side, side)
    x = (torch.randn(shape, generator=gen, device="cuda") * 3 + 1).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(2, channels, generator=gen, device="cuda")
    mean_g, rstd_g = group_stats(x.float(), groups, 1e-6)
    args = (x, g, mean_g, rstd_g, weight, bias)
    kernel = norm_silu.load_kernel().norm_silu_sums
    compiled = torch.compile(norm_silu.torch_sums)
    ours, theirs = kernel(*args), torch.stack(compiled(*args))  # also compiles and warms both
    gbytes = 2 * x.numel() * x.element_size() / 1e9
    row = {"shape": list(shape), "groups": groups,
           "sums_rel_diff": float((ours - theirs).norm() / theirs.norm())}
    for name, fn in (("triton_kernel", lambda: kernel(*args)), ("inductor", lambda: compiled(*args))):
        ms = gpu_ms(fn, repeats)
        row[name] = {"us": round(1000 * ms, 1), "GB_per_s": round(gbytes / ms * 1000, 0)}
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the rows as JSON here too")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("norm_silu_kernel.py times CUDA kernels: no CUDA device here")
    rows = [one_shape(args.batch, c, side, args.groups, args.repeats) for c, side in SHAPES]
    print_and_save({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
