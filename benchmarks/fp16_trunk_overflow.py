"""Does LPIPS's fp16 trunk (``perceptual.HalfTrunk``) overflow on ``train_step.py``'s inputs?

train_step.py times steps on uniform-noise images through a random SD-sized VAE. In the ninth
device session its Colab row (fp16 steps, micro-batches of 8 at 256 px, GradScaler at 2^16)
skipped 2 steps as overflows where the same row with LPIPS in fp32 skipped none. This script
decodes such a micro-batch (fp32, seed 0) and, for each loss scale, takes the pretrained trunk's
gradient of mean LPIPS at the reconstruction in fp16: finite or not, and its largest value
unscaled (the same at every scale that fits). CPU fp16 is slow: ~8 minutes a scale on 2 cores.

    python benchmarks/fp16_trunk_overflow.py --scales 12 16
"""

import argparse
import math
import time

import torch

from furlib.models import load_vae
from furlib.perceptual import LPIPS, fp16_grad_scale, use_fp16_trunk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--scales", type=int, nargs="+", default=[12, 16], help="loss scales as powers of two")
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.time()
    vae = load_vae("random:sd").eval()
    x = torch.rand(args.images, 3, args.res, args.res) * 2 - 1
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.sample()).sample
    print(f"reconstruction: min {recon.min():.3f} max {recon.max():.3f} std {recon.std():.3f}; "
          f"the trunk's own scale 2^{math.log2(fp16_grad_scale(recon)):.0f}", flush=True)
    lpips = LPIPS("vgg", "pretrained")
    use_fp16_trunk(lpips)
    for e in args.scales:
        leaf = recon.clone().requires_grad_(True)
        distance = lpips(leaf, x).float().mean()
        (grad,) = torch.autograd.grad(distance * 2.0**e, leaf)
        print(f"2^{e}: LPIPS {float(distance.detach()):.4f}, gradient finite {bool(grad.isfinite().all())}, "
              f"largest |gradient| unscaled {float(grad.abs().max()) / 2.0**e:.4g} ({time.time() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
