"""How much of the MAE term's gradient the MSE term carries, on real reconstructions (issue 26).

For each held-out photo of the built-in set (the shipped ``tiny`` base never saw them) at 256 px,
centre crop: reconstruct with the ``tiny`` base (posterior mode, fp32), then take the gradients of
the Oklab MAE and MSE terms (plain means, ``ReconstructionLoss``) with respect to the
reconstruction and print ||d (w * MSE)|| / ||d MAE|| for w = 1 and the recipe's 5. The MSE
gradient is 2 * error, so the share scales with the size of the Oklab error; MAE's is sign(error).

    PYTHONPATH=$PWD python benchmarks/mse_share.py [--resolution 256]
"""

import argparse
import json

import torch

from furlib.builtin import HELD_OUT_PHOTOS, PHOTOS, photo_path
from furlib.images import center_crop, load_rgb, to_rgb_m11
from furlib.models import load_vae
from furlib.training.losses import ReconstructionLoss


def grad_at(loss_fn, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The gradient of ``loss_fn(recon, target)`` with respect to the reconstruction."""
    leaf = recon.detach().requires_grad_(True)
    return torch.autograd.grad(loss_fn(leaf, target), leaf)[0]


def grad_of(recon: torch.Tensor, target: torch.Tensor, mae_w: float, mse_w: float,
            space: str = "oklab") -> torch.Tensor:
    """The gradient of the pixel terms (plain means, ``ReconstructionLoss`` in ``space``)."""
    loss = ReconstructionLoss(space)
    return grad_at(lambda r, t: loss(r, t, mae_w, mse_w, 0.0)[0], recon, target)


@torch.no_grad()
def reconstruct(vae, x_m11: torch.Tensor) -> torch.Tensor:
    return vae.decode(vae.encode(x_m11).latent_dist.mode()).sample


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    a = ap.parse_args(argv)
    vae = load_vae("tiny")
    out = {}
    for name, package, folder, filename in PHOTOS:
        if name not in HELD_OUT_PHOTOS:
            continue
        x = to_rgb_m11(center_crop(load_rgb(photo_path(package, folder, filename)), a.resolution))[None]
        recon = reconstruct(vae, x)
        mae = grad_of(recon, x, 1.0, 0.0).norm()
        out[name] = {f"mse_{w}": float(grad_of(recon, x, 0.0, w).norm() / mae) for w in (1.0, 5.0)}
    out["mean"] = {k: sum(v[k] for v in out.values()) / len(out) for k in ("mse_1.0", "mse_5.0")}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
