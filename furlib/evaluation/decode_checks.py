"""Two checks of a VAE's decoder on one image: tiled decoding (seams) and fp16 decoding (overflow).

Input images are ``rgb_m11`` NCHW; latents are ``latent_nchw`` (unscaled, posterior mode).
Differences are reported in [0, 1] units (half the ``rgb_m11`` difference).
"""

import copy
import math

import pandas as pd
import torch
import torch.nn.functional as F

FP16_MAX = 65504.0


def check_latent(vae, rgb_m11: torch.Tensor) -> torch.Tensor:
    """The latent of one image (bicubic-resized) large enough for 2x2 decoder tiles."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = vae.tile_latent_min_size * 3 // 2  # tiles start every 3/4 tile: two per side
    x = F.interpolate(rgb_m11[:1].float(), size=(side * factor,) * 2, mode="bicubic",
                      antialias=True, align_corners=False).clamp(-1, 1)
    with torch.inference_mode():
        return vae.encode(x.to(vae.device)).latent_dist.mode().float()


def _seam_bands(vae, size: int) -> list:
    """Pixel ranges [start, end) where diffusers blends neighbouring decoder tiles."""
    tile = vae.tile_sample_min_size
    tile = tile[0] if isinstance(tile, (list, tuple)) else tile
    blend = int(tile * vae.tile_overlap_factor)
    stride = tile - blend  # each tile keeps this many pixels
    return [(k, min(k + blend, size)) for k in range(stride, size, stride)]


def tiled_decode_check(vae, latent_nchw: torch.Tensor) -> dict:
    """Decode with and without ``vae.enable_tiling()``; differences in [0, 1] units.

    seam_score = mean |tiled - full| inside the tile blend bands / mean outside them:
    1 means the tiling error is spread evenly, > 1 that it sits on the tile borders (seams).
    """
    with torch.inference_mode():
        vae.disable_tiling()
        full = vae.decode(latent_nchw).sample.float()
        vae.enable_tiling()
        try:
            tiled = vae.decode(latent_nchw).sample.float()
        finally:
            vae.disable_tiling()
    diff = ((tiled - full).abs() / 2).mean(1)[0].cpu()  # (H, W), channel mean
    bands = _seam_bands(vae, diff.shape[-1])
    mask = torch.zeros(diff.shape, dtype=torch.bool)
    for a, b in bands:
        mask[a:b, :] = mask[:, a:b] = True
    seam = diff[mask].mean() / diff[~mask].mean().clamp_min(1e-12) if bands else math.nan
    return {"image_px": list(diff.shape), "tiles_per_side": len(bands) + 1,
            "max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "seam_score": float(seam),
            "bands": bands, "col_profile": diff.mean(0).tolist(), "row_profile": diff.mean(1).tolist()}


def _decoder_blocks(vae) -> list:
    """(name, module) of the decoder stages whose outputs are worth watching for overflow."""
    kinds = ("ResnetBlock2D", "Attention", "Upsample2D")
    return [(n, m) for n, m in vae.decoder.named_modules()
            if type(m).__name__ in kinds or n in ("conv_in", "conv_norm_out", "conv_out")]


def fp16_decode_check(vae, latent_nchw: torch.Tensor) -> dict:
    """Decode in float16 (a copy of the VAE); peak |activation| per decoder block via hooks.

    On the CPU this runs where torch has fp16 kernels; if it has none, status says so.
    max_abs_diff_vs_fp32 is in [0, 1] units over the finite pixels.
    """
    from diffusers.utils import logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()  # its "cast with torch_dtype instead" warning: we cast on purpose
    vae16 = copy.deepcopy(vae).to(torch.float16)
    dlog.set_verbosity(verbosity)
    peaks: dict = {}

    def hook(name):
        def record(_module, _inputs, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            peaks[name] = max(peaks.get(name, 0.0), float(t.float().abs().nan_to_num(nan=math.inf, posinf=math.inf).max()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in _decoder_blocks(vae16)]
    try:
        with torch.inference_mode():
            out = vae16.decode(latent_nchw.to(torch.float16)).sample.float()
            ref = vae.decode(latent_nchw.float()).sample.float()
    except (RuntimeError, NotImplementedError) as err:  # no fp16 kernel on this device
        return {"status": f"not run on {vae.device.type}: {type(err).__name__}: {err}"}
    finally:
        for h in handles:
            h.remove()
        del vae16
    finite = torch.isfinite(out)
    first_bad = next((n for n, p in peaks.items() if not math.isfinite(p)), None)
    peak = max((p for p in peaks.values() if math.isfinite(p)), default=math.nan)
    diff = ((out - ref).abs() / 2)[finite]
    return {"status": "overflow" if first_bad or not finite.all() else "ok",
            "nonfinite_values": int((~finite).sum()), "first_nonfinite_block": first_bad,
            "peak_abs": peak, "fp16_max": FP16_MAX, "headroom": FP16_MAX / peak if peak else math.inf,
            "max_abs_diff_vs_fp32": float(diff.max()) if diff.numel() else math.nan, "peaks": peaks}


def decode_checks(vaes: dict, rgb_m11: torch.Tensor) -> tuple:
    """Both checks for every VAE on one image: (summary DataFrame, {name: details})."""
    rows, details = [], {}
    for name, vae in vaes.items():
        z = check_latent(vae, rgb_m11)
        tiled, half = tiled_decode_check(vae, z), fp16_decode_check(vae, z)
        details[name] = {"latent": list(z.shape), "tiled": tiled, "fp16": half}
        rows.append({"model": name, "image_px": "×".join(map(str, tiled["image_px"])),
                     "tiled max |Δ|": tiled["max_abs"], "tiled mean |Δ|": tiled["mean_abs"],
                     "seam score": tiled["seam_score"], "fp16": half["status"],
                     "fp16 peak |act|": half.get("peak_abs"), "fp16 first non-finite": half.get("first_nonfinite_block"),
                     "fp16 max |Δ| vs fp32": half.get("max_abs_diff_vs_fp32")})
    return pd.DataFrame(rows).set_index("model"), details
