"""How hard the pixel terms pull against LPIPS in Oklab and in RGB, and the RGB weights that pull
as hard as the card's Oklab ones (issue 20).

The card's weights (MAE 1 : MSE 5 : LPIPS 1) act on Oklab differences; the ``rgb`` variant keeps
them on [-1, 1] RGB differences, which are several times larger, so it changes the balance
between the pixel terms and LPIPS as well as the colour space. This measures, at the shipped
``tiny`` base's reconstructions of *training* drawings (seed 0, the ablation's corpus: never
scored), the gradient norm at the reconstruction of each term (one batch, plain means, as
``ReconstructionLoss`` computes them) and gives the RGB weights whose gradients match Oklab's:

    mae_rgb = 1 * |d MAE_oklab| / |d MAE_rgb|,   mse_rgb = 5 * |d MSE_oklab| / |d MSE_rgb|

the ``rgb_matched`` variant of ``ablation.py`` (colour space changed, balance kept).

    PYTHONPATH=$PWD python benchmarks/pixel_balance.py --images 64 --out benchmarks/runs/DATE/pixel_balance.json
"""

import argparse

import torch

from furlib import builtin
from furlib.images import center_crop, to_rgb_m11
from furlib.models import load_vae
from furlib.perceptual import LPIPS
from furlib.runinfo import print_and_save
from mse_share import grad_at, grad_of, reconstruct  # a sibling script (benchmarks/ is on sys.path)

TERMS = {"mae": (1.0, 0.0), "mse": (0.0, 1.0)}  # (mae_w, mse_w) of a term alone


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.stack([to_rgb_m11(center_crop(builtin.draw_art(i, 0), a.resolution)) for i in range(a.images)])
    vae = load_vae("tiny").eval()
    recon = torch.cat([reconstruct(vae, x[i:i + 16]) for i in range(0, len(x), 16)])
    lpips = LPIPS("vgg", "pretrained")
    norms = {"lpips": float(grad_at(lambda r, t: lpips(r, t).mean(), recon, x).norm())}
    for space in ("oklab", "rgb"):
        for term, (mae_w, mse_w) in TERMS.items():
            norms[f"{term}_{space}"] = float(grad_of(recon, x, mae_w, mse_w, space).norm())
    matched = {"mae_weight": 1.0 * norms["mae_oklab"] / norms["mae_rgb"],
               "mse_weight": 5.0 * norms["mse_oklab"] / norms["mse_rgb"]}
    pull = {space: (norms[f"mae_{space}"] + 5.0 * norms[f"mse_{space}"]) / norms["lpips"] for space in ("oklab", "rgb")}
    out = {"images": a.images, "resolution": a.resolution, "source": "builtin.draw_art seed 0 (training drawings)",
           "lpips": lpips.source, "grad_norms": norms, "rgb_matched": matched,
           "pixel_over_lpips_at_card_weights": pull}
    return print_and_save(out, a.out)


if __name__ == "__main__":
    main()
