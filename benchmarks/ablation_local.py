"""The ablation's local phase (issue 20), on a CPU: what the device could not do with what it returned.

From a device call's files (``ablation.json`` and the fp16 EMA decoders) it redraws the held-out
drawings (the SHA-256 of their crops must equal the device's), encodes them once with the frozen
base encoder, decodes them with the base and every variant, and computes KID and rFID with the
real FID Inception (``furlib.evaluation.fid_kid``), PSNR again from the fp16 decoders against the
device's fp32 numbers (the rounding shown, not assumed), and writes the page with them
(``ablation_report``; the device's fp32 grid is kept, or one is made from the fp16 decoders).
Per-model results are cached in ``cache`` (one file a model), so an interrupted run continues. CPU cost per held-out image and model: one decode and one
Inception pass (~0.4 s + ~0.3 s on 2 idle cores): ~50 minutes at 500 drawings and 8 decoders
(``--fid-images`` takes the first N for a quicker look; RESULTS.md has the measurement).
"""

import json
import time
from pathlib import Path

import PIL
import torch

import ablation_data
import ablation_report
from ablation_report import GRID_IMAGES


def score(source: Path, out: Path, cache: Path, fid_images: int = 0, batch: int = 16, notes=()) -> int:
    """Write the report of the device's returned ``source`` into ``out``; returns 0."""
    from furlib import models, runinfo
    from furlib.evaluation.fid_kid import RFID

    t0, times = time.time(), {}
    report = json.loads((source / "ablation.json").read_text())
    decoders = ablation_data.read_bundle(source)
    held = report["held_out"]
    x, _ = ablation_data.held_out_art(held["art"], held["resolution"], runinfo.usable_cores())
    same_pixels = ablation_data.digest(x) == held["art_digest"]
    n = min(fid_images or len(x), len(x))
    times["redraw_s"] = time.time() - t0
    cache = cache / f"{held['art_digest'][:12]}_{report['step']}_{n}"
    cache.mkdir(parents=True, exist_ok=True)
    base = models.load_vae("tiny").eval()
    z = _cached(cache / "latents.pt", lambda: ablation_data.encode(base, x[:n], "cpu", batch))
    times["encode_s"] = time.time() - t0 - sum(times.values())
    rfid = RFID("cpu")
    rfid.features["real"] = [_cached(cache / "real.pt", lambda: _features(rfid, ablation_data.m11(x[:n]), batch))]
    per_model = {}
    for name in ["base", *[r["name"] for r in report["results"]]]:
        vae = base if name == "base" else ablation_data.decoder_of(base, decoders[name], "cpu")
        per_model[name] = _cached(cache / f"{name}.pt", lambda: _model_pass(vae, z, x[:n], rfid, batch))
        rfid.features[name] = [per_model[name]["features"]]
    times["decode_and_inception_s"] = time.time() - t0 - sum(times.values())
    fid = rfid.compute()
    local = {name: {"kid": fid[name]["kid"], "rfid": fid[name]["rfid"], "n": fid[name]["n"],
                    "psnr_check": _psnr_check(report, name, per_model[name]["psnr"])} for name in per_model}
    out.mkdir(parents=True, exist_ok=True)
    if not (source / "recon_grid.png").exists():  # else write_page keeps the device's, from fp32 decoders
        ablation_report.grid_png(report, x[:GRID_IMAGES], {k: v["grid"] for k, v in per_model.items()},
                                 out / "recon_grid.png", "fp16")
    times["total_s"] = time.time() - t0
    summary = {"same_pixels_as_device": same_pixels, "pillow": PIL.__version__, "fid_images": n, "local": local,
               "cpu_seconds": times, "torch_threads": torch.get_num_threads()}
    (out / "local.json").write_text(json.dumps(summary, indent=1))
    print(ablation_report.write_page(report, out, summary, source, notes).read_text(), flush=True)
    return 0


def _cached(path: Path, compute):
    if path.exists():
        return torch.load(path)
    value = compute()
    torch.save(value, path)
    return value


def _features(rfid, rgb_m11: torch.Tensor, batch: int) -> torch.Tensor:
    """Inception pool3 features of images in [-1, 1], through RFID.update (its 8-bit rounding)."""
    for i in range(0, len(rgb_m11), batch):
        rfid.update("_scratch", rgb_m11[i:i + batch])
    return torch.cat(rfid.features.pop("_scratch"))


@torch.no_grad()
def _model_pass(vae, z: torch.Tensor, x_u8: torch.Tensor, rfid, batch: int) -> dict:
    """One decoder over the held-out latents: per-image PSNR, Inception features, grid crops."""
    from furlib.evaluation.metrics import psnr

    psnrs, feats, grid = [], [], None
    for i in range(0, len(z), batch):
        recon = ablation_data.decode(vae, z[i:i + batch], batch)
        psnrs.append(psnr(ablation_data.m11(x_u8[i:i + batch]), recon))
        feats.append(_features(rfid, recon, batch))
        grid = recon[:GRID_IMAGES] if grid is None else grid
    return {"psnr": torch.cat(psnrs), "features": torch.cat(feats), "grid": grid}


def _psnr_check(report: dict, name: str, local_psnr: torch.Tensor) -> dict:
    """The fp16 decoder's PSNR here against the device's fp32 EMA on the same images."""
    scores = report["base"] if name == "base" else next(r["scores"] for r in report["results"] if r["name"] == name)
    device = torch.tensor(scores["art"]["psnr_per_image"][:len(local_psnr)])
    diff = local_psnr.double() - device.double()
    return {"device_fp32": float(device.mean()), "local_fp16": float(local_psnr.mean()),
            "mean_diff_db": float(diff.mean()), "max_abs_diff_db": float(diff.abs().max())}
