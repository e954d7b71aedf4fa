"""The ablation's local phase (issue 20), on a CPU: what the device could not do with what it returned.

From a device call's files (``ablation.json`` and the fp16 EMA decoders) it redraws the held-out
drawings (the SHA-256 of their crops must equal the device's), encodes them once with the frozen
base encoder, decodes them with the base and every variant, and computes KID and rFID with the
real FID Inception (``furlib.evaluation.fid_kid``), PSNR again from the fp16 decoders against the
device's fp32 numbers (the rounding shown, not assumed), the held-out curves, a reconstruction
grid with zooms, and the table. Per-model results are cached in ``cache`` (one file a model), so
an interrupted run continues. CPU cost per held-out image and model: one decode and one
Inception pass (~0.4 s + ~0.3 s on 2 idle cores): ~50 minutes at 500 drawings and 8 decoders
(``--fid-images`` takes the first N for a quicker look; RESULTS.md has the measurement).
"""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import ablation_checks
import ablation_data
import variant_runs

GRID_IMAGES = 3  # held-out drawings in the reconstruction grid
ZOOM = 4         # the zoomed square is 1/ZOOM of the side, where the base errs most
TABLE = (("psnr", "PSNR (dB) ↑", ".2f"), ("ssim", "SSIM ↑", ".4f"), ("delta_e_ok", "ΔE_ok ↓", ".4f"),
         ("lpips_vgg", "LPIPS vgg ↓", ".4f"), ("lpips", "LPIPS alex ↓", ".4f"), ("kid", "KID ↓", ".4f"),
         ("rfid", "FID ↓", ".2f"), ("hf_ratio", "HF ratio (1 = orig.)", ".3f"), ("ab_shift", "colour shift ‖Δab‖ ↓", ".4f"))


def score(source: Path, out: Path, cache: Path, fid_images: int = 0, batch: int = 16) -> int:
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
    curves_png(report, out / "curves.png")
    grid_png(report, x[:GRID_IMAGES], {k: v["grid"] for k, v in per_model.items()}, out / "recon_grid.png")
    times["total_s"] = time.time() - t0
    summary = {"same_pixels_as_device": same_pixels, "fid_images": n, "local": local, "cpu_seconds": times,
               "torch_threads": torch.get_num_threads()}
    (out / "local.json").write_text(json.dumps(summary, indent=1))
    shutil.copyfile(source / "ablation.json", out / "device.json")
    (out / "ablation.md").write_text(markdown(report, summary))
    print((out / "ablation.md").read_text(), flush=True)
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


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(report: dict, summary: dict) -> str:
    """The report page: what ran, the tables, the cross-check, the noise and stability tables."""
    s, held, local = report["settings"], report["held_out"], summary["local"]
    rows = [("base (`tiny`, photo-trained)", report["base"], local["base"])] + [
        (r["name"], r["scores"], local[r["name"]]) for r in report["results"]]
    reached = ", ".join(f"{r['name']} {r['train']['reached']}" for r in report["results"])
    head = [f"Compared at step **{report['step']}** (planned {s['steps']}; last checkpoint every variant saved; "
            f"reached: {reached}), batch {s['batch']}, {s['resolution']} px, base `tiny`, lr x{s['lr_scale']}, "
            f"LPIPS trunks: {report['lpips']}. Corpus: {report['corpus']['count']} drawings of seed "
            f"{report['corpus']['seed']} (long side <= {report['corpus']['max_side']} px). Device: "
            f"{report['device']}.", "",
            "Device calls: " + "; ".join(f"`{' '.join(c['argv'])}` ({c['training_s']:.0f} s training)"
                                         for c in report["calls"]), ""]
    art = [f"Held-out drawings: {held['art']} of seed {held['art_seed']}, never trained on; KID and FID on "
           f"{summary['fid_images']} (KID: one subset of all; FID is biased upwards below 2048 images). "
           "Redrawn here: " + ("the same pixels as the device's." if summary["same_pixels_as_device"]
                               else "**other pixels than the device's** (Pillow differs): KID/FID not comparable.") + "\n",
           "| model | " + " | ".join(label for _, label, _ in TABLE) + " |", "|---|" + "---|" * len(TABLE)]
    for name, sc, lo in rows:
        vals = dict(sc["art"], kid=lo["kid"], rfid=lo["rfid"])
        art.append(f"| {name} | " + " | ".join(_fmt(vals.get(k), f) for k, _, f in TABLE) + " |")
    photo_keys = [t for t in TABLE if t[0] not in ("kid", "rfid")]
    photos = [f"\nHeld-out photographs ({', '.join(held['photos'])}: all the built-in set holds; the base's "
              "domain, what the finetune costs there):\n",
              "| model | " + " | ".join(label for _, label, _ in photo_keys) + " |", "|---|" + "---|" * len(photo_keys)]
    photos += [f"| {name} | " + " | ".join(_fmt(sc["photos"].get(k), f) for k, _, f in photo_keys) + " |" for name, sc, _ in rows]
    if not held["photos"]:
        photos = ["\nHeld-out photographs: none were found on the device (scikit-image absent): not scored."]
    check = ["\nfp16 decoders here vs the device's fp32 EMA, PSNR on the same drawings:\n",
             "| model | device fp32 (dB) | here fp16 (dB) | mean diff | largest per-image diff |", "|---|---|---|---|---|"]
    check += [f"| {n} | {lo['psnr_check']['device_fp32']:.4f} | {lo['psnr_check']['local_fp16']:.4f} | "
              f"{lo['psnr_check']['mean_diff_db']:+.4f} | {lo['psnr_check']['max_abs_diff_db']:.4f} |" for n, _, lo in rows]
    results = [dict(r, scores={"finetuned-ema": r["scores"]["art"]}) for r in report["results"]]
    twin = f"furception_v1_seed{s['noise_seed']}"
    noise = ablation_checks.noise_section(results, "furception_v1", twin) if s["noise_seed"] >= 0 else \
        "run-to-run noise: not measured (--noise-seed -1)\n"
    tail = ["", noise, variant_runs.stability(results),
            "Variants (02 overrides on top of the profile, before the scaling every variant shares):", ""]
    tail += [f"- `{n}`: params/{p}.yaml {json.dumps(o)}" for n, (p, o) in report["variants"].items()]
    tail += ["", f"Local CPU time: {json.dumps({k: round(v) for k, v in summary['cpu_seconds'].items()})} "
             f"({summary['torch_threads']} threads)."]
    return "\n".join(head + art + photos + check + tail) + "\n"


def curves_png(report: dict, path: Path) -> None:
    """Held-out LPIPS(vgg) and ΔE_ok of every variant's EMA against steps (step 0: the base)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (key, label) in zip(axes, (("lpips_vgg", "LPIPS (vgg) ↓"), ("delta_e_ok", "ΔE_ok ↓"))):
        for r in report["results"]:
            ax.plot([p["step"] for p in r["curve"]], [p[key] for p in r["curve"]], marker=".", lw=1, label=r["name"])
        ax.axhline(report["results"][0]["curve"][0][key], color="k", ls="--", lw=1, label="base")
        ax.set(xlabel="training step", ylabel=label, title=f"held-out {label}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"EMA decoders on the first {report['held_out']['curve_images']} held-out drawings "
                 f"(seed {report['held_out']['art_seed']}), {report['held_out']['resolution']} px")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def grid_png(report: dict, x_u8: torch.Tensor, recons: dict, path: Path) -> None:
    """Rows: each held-out drawing, then a zoom of the square where the base errs most (boxed);
    columns: original, base, every variant's EMA (fp16 decoder), with per-image PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from furlib.evaluation.eval_figures import error_map, largest_difference
    from furlib.evaluation.metrics import psnr
    from furlib.images import to_uint8

    orig = [to_uint8(ablation_data.m11(x)) for x in x_u8]
    columns = {"original": orig, **{k: [to_uint8(r) for r in v] for k, v in recons.items()}}
    size = x_u8.shape[-1] // ZOOM
    fig, axes = plt.subplots(2 * len(orig), len(columns), figsize=(1.9 * len(columns), 3.9 * len(orig)), squeeze=False)
    for i, o in enumerate(orig):
        e_base = error_map(o, columns["base"][i])
        top, left = largest_difference(e_base, np.zeros_like(e_base), size)
        for j, (name, imgs) in enumerate(columns.items()):
            axes[2 * i, j].imshow(imgs[i])
            axes[2 * i + 1, j].imshow(imgs[i][top:top + size, left:left + size], interpolation="nearest")
            if name != "original":
                p = psnr(ablation_data.m11(x_u8[i:i + 1]), ablation_data.m11(torch.from_numpy(imgs[i]).permute(2, 0, 1)[None]))
                axes[2 * i, j].set_xlabel(f"{float(p):.2f} dB", fontsize=8)
            axes[2 * i, j].set_title(name if i == 0 else "", fontsize=9)
        axes[2 * i, 0].add_patch(Rectangle((left - 0.5, top - 0.5), size, size, fill=False, ec="cyan", lw=1.5))
        axes[2 * i, 0].set_ylabel(f"held-out #{i}", fontsize=9)
        axes[2 * i + 1, 0].set_ylabel(f"zoom x{ZOOM} (box)", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"Held-out drawings at {x_u8.shape[-1]} px, EMA decoders at step {report['step']}\n"
                 f"zoom: the 1/{ZOOM}-side square where the base errs most", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
